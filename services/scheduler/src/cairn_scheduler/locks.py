"""The scheduler's side of the gateway's lock per job fingerprint: release it when the job ends.

The lock (`JOB_LOCK_KEY`, value: the job id) is deleted only while it still names this job
(cairn_runtime.redis_lock's compare and delete), so a lock another job has taken since is never
touched. A failed release is only logged: the gateway takes over a lock whose job has finished,
and the lock's TTL ends it anyway.
"""

import logging
from typing import Any

import redis.asyncio as aioredis

from cairn_runtime.redis_lock import release_job_lock

logger = logging.getLogger(__name__)


class JobLockRelease:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def release_job(self, job: dict[str, Any]) -> bool:
        """True if this call deleted the lock of the finished job (`_id`, `tenant`, `spec_fingerprint`)."""
        try:
            return await release_job_lock(self._redis, self._prefix, job)
        except Exception:
            logger.warning("lock of finished job %s not released (its TTL will end it)", job["_id"], exc_info=True)
            return False

    async def close(self) -> None:
        await self._redis.aclose()
