"""Forgetting a reopened job's cached status (the gateway caches finished jobs' status)."""

import logging

import redis.asyncio as aioredis

from cairn_contracts.store import STATUS_CACHE_KEY

logger = logging.getLogger(__name__)


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
