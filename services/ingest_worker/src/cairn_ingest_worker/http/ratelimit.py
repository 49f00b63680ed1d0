"""A per-host request rate limit shared by every worker process, kept in Redis by `limits`.

The limit is a moving window (`limits.strategies.MovingWindowRateLimiter`: one Lua script per
hit, atomic in Redis), keyed by host, so all the workers of all the jobs that read one host share
it: `"10/second"` means at most 10 requests to that host in any second, whatever the number of
workers. A request that does not fit waits until the window has room (the window's reset time),
never longer than the caller's `max_wait_s`.

Without Redis (no client given) the limit is kept in the process (`MemoryStorage`): it still
paces this process, but is not shared, which is logged once. If Redis stops answering, requests
go through without the limit (logged at most once a minute), as the gateway's rate limit does:
the limit protects the remote API's capacity and the fetcher still honours its 429 answers.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

logger = logging.getLogger(__name__)

NAMESPACE = "http-host"
_LOG_EVERY_S = 60.0


def parse_rate(text: str) -> RateLimitItem:
    """A rate such as `"10/second"`, `"600 per minute"`, `"5/2 seconds"` (the `limits` notation).
    Raises ValueError for text it cannot read."""
    return parse(text)


def redis_storage(client: Any, prefix: str) -> RedisStorage:
    """`limits`' Redis storage over an existing redis.Redis client's connection pool; keys are
    `{prefix}:ratelimit:...` so a test run's prefix isolates them."""
    return RedisStorage("redis://", connection_pool=client.connection_pool, key_prefix=f"{prefix}:ratelimit", wrap_exceptions=True)


class HostRateLimiter:
    """Blocks until one more request to a host fits under its rate.

    `storage`: where the windows live (RedisStorage: shared by every worker; MemoryStorage: this
    process only). `sleep`/`now` are injectable for tests (seconds).
    """

    def __init__(self, storage: Storage, *, sleep: Callable[[float], None] = time.sleep, now: Callable[[], float] = time.time) -> None:
        self._limiter = MovingWindowRateLimiter(storage)
        self._shared = isinstance(storage, RedisStorage)
        self._sleep = sleep
        self._now = now
        self._last_warning = -_LOG_EVERY_S

    @property
    def shared(self) -> bool:
        """Whether the limit is shared by all workers (kept in Redis)."""
        return self._shared

    def acquire(self, host: str, rate: RateLimitItem, max_wait_s: float = 300.0) -> float:
        """Take one request of `host`'s `rate`, waiting for room if needed; the seconds waited.
        Raises TimeoutError (retryable) if there is no room within `max_wait_s`."""
        waited = 0.0
        while True:
            try:
                if self._limiter.hit(rate, NAMESPACE, host):
                    return waited
                reset_at = self._limiter.get_window_stats(rate, NAMESPACE, host).reset_time
            except StorageError as error:
                self._warn_unavailable(error)
                return waited
            # The moving window frees its oldest entry at reset_at; a few ms more avoids a busy loop.
            pause = max(0.005, reset_at - self._now())
            if waited + pause > max_wait_s:
                raise TimeoutError(f"rate limit {rate} of {host}: no room within {max_wait_s} s")
            self._sleep(pause)
            waited += pause

    def _warn_unavailable(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_EVERY_S:
            self._last_warning = now
            logger.warning("rate limit store unavailable (%s): requests go through without the shared limit", error)


def host_limiter(redis_client: Any | None, prefix: str) -> HostRateLimiter:
    """The limiter of a worker process: shared through `redis_client` if given, else in-process."""
    if redis_client is None:
        logger.warning("no Redis client: the http_json rate limit is kept per process, not shared by the workers")
        return HostRateLimiter(MemoryStorage())
    return HostRateLimiter(redis_storage(redis_client, prefix))
