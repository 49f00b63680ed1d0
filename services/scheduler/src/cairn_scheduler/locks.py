"""The scheduler's side of the gateway's lock per job fingerprint: release it when the job ends.

The lock (`JOB_LOCK_KEY`, value: the job id) is deleted only while it still names this job
(compare and delete in one Lua script), so a lock another job has taken since is never touched.
A failed release is only logged: the gateway takes over a lock whose job has finished, and the
lock's TTL ends it anyway.
"""

import logging
from typing import Any

import redis.asyncio as aioredis

from cairn_contracts.store import JOB_LOCK_KEY

logger = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class JobLockRelease:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def release_job(self, job: dict[str, Any]) -> bool:
        if not job.get("spec_fingerprint") or not job.get("tenant"):
            return False
        key = JOB_LOCK_KEY.format(prefix=self._prefix, tenant=job["tenant"], fingerprint=job["spec_fingerprint"])
        try:
            return bool(await self._redis.eval(_RELEASE, 1, key, job["_id"]))
        except Exception:
            logger.warning("lock of finished job %s not released (its TTL will end it)", job["_id"], exc_info=True)
            return False

    async def close(self) -> None:
        await self._redis.aclose()
