"""Redis locks whose value names their holder, changed only by whoever still holds them.

Each write is one Lua script that compares the stored holder first (compare and set / extend /
delete), so a lock that expired and was taken by someone else meanwhile is never touched.
Used for the job lock per fingerprint (`JOB_LOCK_KEY`, value: the job id): the gateway takes,
extends and takes over such locks (cairn_gateway.joblock), the scheduler releases them when the
job ends (cairn_scheduler.locks). docs/design.md, "Duplicate jobs", says why.

The client is any `redis.asyncio.Redis` (anything with its `eval`): this module imports no Redis
library. Every function raises whatever the client raises (redis.exceptions.ConnectionError,
TimeoutError...): what an unavailable Redis means is the caller's decision.
"""

from collections.abc import Awaitable
from typing import Any, Protocol

from cairn_contracts.store import JOB_LOCK_KEY

# KEYS[1] lock; ARGV[1] expected holder; ARGV[2] new holder; ARGV[3] ttl ms
_REPLACE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] lock; ARGV[1] holder; ARGV[2] ttl ms
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock; ARGV[1] holder
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class ScriptClient(Protocol):
    """The part of `redis.asyncio.Redis` these locks use."""

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...


async def replace_if_held(redis: ScriptClient, key: str, holder: str, new_holder: str, ttl_ms: int) -> bool:
    """Hand the lock from `holder` to `new_holder` for `ttl_ms` ms; False if `holder` does not hold it."""
    return bool(await redis.eval(_REPLACE, 1, key, holder, new_holder, ttl_ms))


async def extend_if_held(redis: ScriptClient, key: str, holder: str, ttl_ms: int) -> bool:
    """Let the lock live `ttl_ms` ms from now; False if `holder` does not hold it (nothing changed)."""
    return bool(await redis.eval(_EXTEND, 1, key, holder, ttl_ms))


async def release_if_held(redis: ScriptClient, key: str, holder: str) -> bool:
    """Delete the lock; False if `holder` does not hold it (nothing changed)."""
    return bool(await redis.eval(_RELEASE, 1, key, holder))


def job_lock_key(prefix: str, tenant: str, fingerprint: str) -> str:
    """The Redis key of a tenant's job lock per spec fingerprint (`JOB_LOCK_KEY`)."""
    return JOB_LOCK_KEY.format(prefix=prefix, tenant=tenant, fingerprint=fingerprint)


async def release_job_lock(redis: ScriptClient, prefix: str, job: dict[str, Any]) -> bool:
    """Release the lock of a finished job (a `jobs` document with `_id`, `tenant`,
    `spec_fingerprint`) if it still names that job. False when it does not, or the document has no
    tenant or fingerprint (nothing to release)."""
    if not job.get("spec_fingerprint") or not job.get("tenant"):
        return False
    return await release_if_held(redis, job_lock_key(prefix, job["tenant"], job["spec_fingerprint"]), job["_id"])
