"""The Redis lock per job fingerprint: an identical job of the same tenant does not run twice at once.

Two layers guard a job (docs/design.md, "Duplicate jobs"):
- MongoDB's unique (tenant, idempotency_key) index stops the same submission from being stored
  twice (the authority: it holds with Redis down);
- this lock, `{prefix}:joblock:{tenant}:{fingerprint}` = job id, refuses a second job with the same
  spec (any or no idempotency key) while the first one is unfinished (409 naming it).

The gateway takes the lock before inserting the job, first with a short TTL (a gateway that dies
before the insert leaves no lasting lock), then, once the job is stored, with the full
`CAIRN_JOB_LOCK_TTL_S`. The scheduler deletes it when the job is terminal, only if it still names
that job. Every write compares the holder first (cairn_runtime.redis_lock's Lua scripts). A lock
whose job is finished or gone is taken over (compare and set), so a missed release never blocks a
tenant; the TTL bounds the rest.

If Redis does not answer (refused, timed out, or no pool connection free within
`CAIRN_REDIS_POOL_TIMEOUT_S`: a busy pool waits, it is not "down"), jobs are accepted without the
lock, deliberately: Redis is a guard, not the record, and the guarantee a client relies on to
retry safely (one job per Idempotency-Key) is MongoDB's unique index, which holds regardless.
What is lost while Redis is away is only the refusal of an identical job submitted without a key.
Counted as `cairn_gateway_dependency_fallbacks_total{dependency="redis",use="job_lock"}` and logged
at most once a minute (degraded.py).
"""

import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS
from cairn_gateway.degraded import REDIS_UNAVAILABLE, fell_back
from cairn_gateway.errors import Conflict
from cairn_runtime.redis_lock import extend_if_held, job_lock_key, release_if_held, release_job_lock, replace_if_held

logger = logging.getLogger(__name__)

PENDING_TTL_MS = 30_000  # the lock of a job being recorded


class DuplicateJob(Conflict):
    """An identical job of the tenant is not finished yet."""

    at = ("body",)  # the submitted spec is the identical one

    def __init__(self, running_job_id: str) -> None:
        super().__init__(f"an identical job is not finished yet: {running_job_id}; cancel it or wait for it to end")
        self.running_job_id = running_job_id


@dataclass(frozen=True)
class Lock:
    key: str
    job_id: str
    taken: bool  # False: Redis was unavailable, or the lock is held by this same submission


class JobLocks:
    def __init__(self, redis: aioredis.Redis, prefix: str, ttl_s: int, db: AsyncDatabase) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = int(ttl_s * 1000)
        self._db = db

    @property
    def enabled(self) -> bool:
        return self._ttl_ms > 0

    def key(self, tenant: str, fingerprint: str) -> str:
        return job_lock_key(self._prefix, tenant, fingerprint)

    async def acquire(self, tenant: str, fingerprint: str, job_id: str) -> Lock:
        key = self.key(tenant, fingerprint)
        if not self.enabled:
            return Lock(key, job_id, taken=False)
        try:
            for _ in range(5):
                if await self._redis.set(key, job_id, nx=True, px=PENDING_TTL_MS):
                    return Lock(key, job_id, taken=True)
                holder = _text(await self._redis.get(key))
                if holder is None:
                    continue  # expired meanwhile: try again
                if holder == job_id:
                    return Lock(key, job_id, taken=False)  # this same submission (same idempotency key) in flight
                job = await self._db[JOBS].find_one({"_id": holder, "tenant": tenant}, {"state": 1})
                if job is None or not _finished(job):
                    # Unfinished, or being recorded right now (its short TTL covers a gateway that died).
                    raise DuplicateJob(holder)
                if await replace_if_held(self._redis, key, holder, job_id, PENDING_TTL_MS):
                    return Lock(key, job_id, taken=True)  # the holder had finished: taken over
        except REDIS_UNAVAILABLE as error:
            fell_back("redis", "job_lock", error, "jobs are accepted without the lock per identical spec")
        return Lock(key, job_id, taken=False)

    async def hold(self, lock: Lock) -> None:
        """The job is stored: keep the lock for the full TTL (or until the job ends)."""
        await self._guarded(extend_if_held(self._redis, lock.key, lock.job_id, self._ttl_ms))

    async def release(self, lock: Lock) -> None:
        if lock.taken:
            await self._guarded(release_if_held(self._redis, lock.key, lock.job_id))

    async def release_job(self, job: dict[str, Any]) -> None:
        """Release the lock of a deleted or finished job (its `jobs` document) if it still names it."""
        if self.enabled:
            await self._guarded(release_job_lock(self._redis, self._prefix, job))

    async def _guarded(self, call: Coroutine[Any, Any, bool]) -> None:
        try:
            await call
        except REDIS_UNAVAILABLE as error:
            # An unextended lock lapses after its short TTL; an unreleased one is taken over once
            # its job is finished: either way no tenant stays blocked.
            fell_back("redis", "job_lock", error, "a job lock was not extended or released")


def _finished(job: dict[str, Any]) -> bool:
    try:
        return JobState(job["state"]).is_terminal
    except (KeyError, ValueError):
        return False


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
