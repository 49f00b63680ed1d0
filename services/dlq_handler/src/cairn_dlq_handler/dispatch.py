"""Sending a replayed shard's Celery task, and forgetting a reopened job's cached status.

The task goes out through Celery's own client with the shared configuration (publisher
confirms on: `send_shard_task` returns once the broker confirmed, and raises if it did not), so
the message is the same genuine Celery task the scheduler sends.
"""

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from cairn_contracts.store import STATUS_CACHE_KEY
from cairn_runtime.celery_config import celery_config, send_shard_task

logger = logging.getLogger(__name__)


class CeleryShardDispatcher:
    def __init__(self, app: Celery) -> None:
        self._app = app

    @classmethod
    def for_broker(cls, broker_url: str) -> "CeleryShardDispatcher":
        app = Celery("cairn-dlq-handler")
        app.conf.update(celery_config(broker_url))
        return cls(app)

    async def dispatch(self, job_id: str, shard: dict[str, Any], priority: int) -> None:
        await asyncio.to_thread(send_shard_task, self._app, job_id, shard, priority)


class RedisStatusCache:
    """The gateway caches finished jobs' status; a replay reopens a finished job, so its entry goes."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    async def forget(self, tenant: str, job_id: str) -> None:
        try:
            await self._client.delete(STATUS_CACHE_KEY.format(prefix=self._prefix, tenant=tenant, job_id=job_id))
        except Exception:  # a cache: an outage must not stop a replay (the entry expires on its own)
            logger.warning("could not drop the cached status of job %s", job_id, exc_info=True)

    async def close(self) -> None:
        await self._client.aclose()
