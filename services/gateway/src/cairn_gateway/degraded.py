"""What the gateway does without Redis: each deliberate fallback is counted and logged, sparingly.

Redis is a cache and a guard in front of MongoDB, never the record (docs/design.md, "Dependencies
down"). When it does not answer (refused, timed out, or no pool connection free within
`CAIRN_REDIS_POOL_TIMEOUT_S`), a request goes on without it:

- `status_cache`: the status is read from MongoDB (and not cached);
- `rate_limit`: the request is let through (the limit protects capacity; it is not a security
  boundary, and refusing every call because a cache is down would be a worse outage);
- `job_lock`: the job is accepted without the per-spec lock; an identical submission under the
  same Idempotency-Key still makes one job (MongoDB's unique index), only the refusal of an
  identical job *without* a key is skipped while Redis is away.

Each fallback increments `cairn_gateway_dependency_fallbacks_total{dependency="redis", use=...}`
and logs one warning per use per `LOG_EVERY_S` (with the count of those not logged), not one
line per request.
"""

import logging
import time

from prometheus_client import Counter
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

LOG_EVERY_S = 60.0

FALLBACKS = Counter(
    "cairn_gateway_dependency_fallbacks_total",
    "Requests served without a dependency that did not answer (dependency, what it was used for)",
    ["dependency", "use"],
)

# The errors that mean "Redis did not answer": connection refused or reset, timeouts, a pool with
# no free connection in time (all RedisError), and the OS/asyncio errors beneath them.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

_last_logged: dict[tuple[str, str], float] = {}
_unlogged: dict[tuple[str, str], int] = {}


def fell_back(dependency: str, use: str, error: BaseException, consequence: str) -> None:
    """Count one fallback and log it, at most once per `LOG_EVERY_S` per (dependency, use)."""
    FALLBACKS.labels(dependency, use).inc()
    warn_sparingly((dependency, use), "%s did not answer (%s: %s); %s", dependency, type(error).__name__, error, consequence)


def warn_sparingly(key: tuple[str, str], message: str, *args: object) -> None:
    """Log a warning at most once per `LOG_EVERY_S` per `key`, saying how many were held back:
    a dependency that is down fails every request, and a line per request would drown the log."""
    now = time.monotonic()
    last = _last_logged.get(key)
    if last is not None and now - last < LOG_EVERY_S:
        _unlogged[key] = _unlogged.get(key, 0) + 1
        return
    _last_logged[key] = now
    more = _unlogged.pop(key, 0)
    logger.warning(message + (" (%d more since the last such line)" if more else ""), *args, *((more,) if more else ()))
