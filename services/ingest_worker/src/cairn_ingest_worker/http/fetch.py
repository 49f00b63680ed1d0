"""One page of an HTTP JSON API, fetched with timeouts, the shared rate limit and bounded retries.

Each request first takes its host's rate limit (`HostRateLimiter`), then is sent by httpx with
separate connect and read timeouts. What is retried here, inside the batch, before the shard's
own retry policy (a new attempt from the last checkpoint) takes over:

- a transport failure (connect error, connect/read timeout, connection reset): `PageUnavailable`;
- a retryable status (429, 408, 425, 5xx but 501/505: `classify_http_status` in errors.py):
  waiting its `Retry-After` (seconds or an HTTP date) when it gives one, else exponential backoff
  with full jitter; a `Retry-After` longer than `max_retry_after_s` is not waited here: the
  `HttpStatusError` goes up at once and the shard is retried later;
- a body that is not JSON (a truncated or garbled page): `MalformedPage`.

A non-retryable status (400, 401, 403, 404, ...) raises `HttpStatusError` at once: the worker's
classification sends the shard to the dead-letter queue. When the tries run out the last error
goes up (all of them retryable), and the shard's retry policy applies.

Request headers may hold a secret (`Authorization`): nothing here logs or raises them; error
messages name the method, the URL and the status only.
"""

import email.utils
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from limits import RateLimitItem
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from cairn_ingest_worker.errors import classify_http_status
from cairn_ingest_worker.http.ratelimit import HostRateLimiter
from cairn_runtime import egress
from cairn_sdk import HttpStatusError, NonRetryableError, RetryableError

logger = logging.getLogger(__name__)


class PageUnavailable(RetryableError):
    """The request failed in transport (connect, timeout, reset): worth another try."""


class MalformedPage(RetryableError):
    """The answer was 2xx but its body is not JSON (truncated or garbled): worth another try."""


@dataclass(frozen=True)
class FetchPolicy:
    """Timeouts and in-batch retries of one page request (seconds).

    `max_tries`: requests of one page before its last error goes up (>= 1); `backoff_base_s`,
    `backoff_max_s`: the delay before try n is uniform in [0, min(max, base * 2^(n-1))] when the
    answer names no Retry-After; `max_retry_after_s`: a longer Retry-After is not waited in-batch.
    `max_rate_wait_s`: longest wait for room under the rate limit.
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_tries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 60.0
    max_rate_wait_s: float = 300.0

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_timeout_s, read=self.read_timeout_s, write=self.read_timeout_s, pool=self.connect_timeout_s)


@dataclass(frozen=True)
class Page:
    """One fetched page: the final `url` (after redirects), its `headers`, raw `content` (bytes)
    and the decoded JSON `body`; `next_link`: the absolute URL of its `Link: rel="next"`, if any."""

    url: str
    headers: Mapping[str, str]
    content: bytes
    body: Any
    next_link: str | None


def retry_after_s(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """Seconds to wait from a `Retry-After` header value: delta-seconds or an HTTP date (RFC 9110);
    None if absent or unreadable; never negative."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now()).total_seconds())


def origin(url: str | httpx.URL) -> str:
    """`scheme://host:port` of a URL (the default port spelt out): what a secret is bound to."""
    parsed = httpx.URL(str(url))
    return f"{parsed.scheme}://{parsed.host}:{parsed.port or {'http': 80, 'https': 443}.get(parsed.scheme)}"


def build_client(
    policy: FetchPolicy,
    headers: Mapping[str, str] | None = None,
    *,
    secret: tuple[str, str] | None = None,
    secret_origins: Collection[str] = (),
    allow_private_networks: bool = False,
) -> httpx.Client:
    """The httpx client of one pipeline run: pooled connections, the policy's timeouts, redirects
    followed (GET only), `headers` sent with every request. `secret`: (header, value) sent only to
    `secret_origins` (see `origin`): a Link or a redirect to another host gets the request
    without it (httpx drops `Authorization` on such redirects, not other header names). Unless
    `allow_private_networks`, a request to a host that resolves to a loopback, private or
    link-local address raises `RefusedUrl` (dead-lettered) before anything is sent."""
    hooks: list[Callable[[httpx.Request], None]] = [] if allow_private_networks else [_public_hosts_only]
    if secret:
        hooks.append(_secret_header(secret[0], secret[1], frozenset(secret_origins)))
    return httpx.Client(timeout=policy.timeout(), headers=dict(headers or {}), follow_redirects=True, event_hooks={"request": hooks})


class RefusedUrl(NonRetryableError):
    """The URL's host (the job's, a Link's or a redirect's) resolves to a non-public address."""


def _public_hosts_only(request: httpx.Request) -> None:
    """Before every request, each redirect included: the SSRF guard (cairn_runtime.egress)."""
    try:
        # The ASCII name httpx connects to (IDNA 2008): the Unicode `host`, resolved, would be
        # encoded by Python's IDNA 2003 codec, another name for some hosts (faß.de -> fass.de).
        egress.check_host(request.url.raw_host.decode("ascii"), "CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS")
    except egress.RefusedHost as refused:
        raise RefusedUrl(f"GET {_safe(str(request.url))}: {refused}") from None
    except OSError as error:  # not resolvable now: a transport failure, retried
        raise httpx.ConnectError(str(error), request=request) from None


def _secret_header(name: str, value: str, origins: frozenset[str]) -> Callable[[httpx.Request], None]:
    def bind(request: httpx.Request) -> None:  # runs before every request, each redirect included
        if origin(request.url) in origins:
            request.headers[name] = value
        else:
            request.headers.pop(name, None)

    return bind


class PageFetcher:
    """GETs pages through `client`, paced by `limiter` at `rate` per host (no limit if either is None)."""

    def __init__(
        self,
        client: httpx.Client,
        policy: FetchPolicy,
        *,
        limiter: HostRateLimiter | None = None,
        rate: RateLimitItem | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._policy = policy
        self._limiter = limiter
        self._rate = rate
        self._sleep = sleep
        self.requests = 0  # requests sent, retries included (for tests and the bench)
        self.retries = 0

    def get(self, url: str, params: Mapping[str, str] | None = None) -> Page:
        """The page at `url` (with query `params` added). Raises HttpStatusError (non-retryable
        status at once; retryable once the tries run out), PageUnavailable or MalformedPage."""
        retrying = Retrying(
            stop=stop_after_attempt(self._policy.max_tries),
            wait=self._wait,
            retry=retry_if_exception(self._worth_retrying),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(self._get_once, url, params)

    def _get_once(self, url: str, params: Mapping[str, str] | None) -> Page:
        if self._limiter is not None and self._rate is not None:
            host = urlsplit(url).netloc
            self._limiter.acquire(host, self._rate, self._policy.max_rate_wait_s)
        self.requests += 1
        try:
            response = self._client.get(url, params=dict(params) if params else None)
        except httpx.TransportError as error:  # connect/read timeouts, refused, reset, protocol
            raise PageUnavailable(f"GET {_safe(url)}: {type(error).__name__}") from error
        if response.status_code >= 400:
            raise HttpStatusError(response.status_code, f"GET {_safe(str(response.url))}", retry_after_s(response.headers.get("Retry-After")))
        try:
            body = json.loads(response.content)
        except ValueError as error:
            raise MalformedPage(f"GET {_safe(str(response.url))}: the body is not JSON ({error})") from error
        link = response.links.get("next", {}).get("url")
        return Page(str(response.url), response.headers, response.content, body, str(response.url.join(link)) if link else None)

    def _worth_retrying(self, error: BaseException) -> bool:
        if isinstance(error, HttpStatusError):
            if not classify_http_status(error.status):
                return False
            # A long Retry-After is the server asking for a pause longer than a batch should
            # hold its lease: the shard is retried later instead.
            return error.retry_after_s is None or error.retry_after_s <= self._policy.max_retry_after_s
        return isinstance(error, (PageUnavailable, MalformedPage))

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, HttpStatusError) and error.retry_after_s is not None:
            return error.retry_after_s
        backoff = wait_random_exponential(multiplier=self._policy.backoff_base_s, max=self._policy.backoff_max_s)
        return float(backoff(state))

    def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.info("page try %d failed (%s); retrying in %.2f s", state.attempt_number, error, delay)


def _safe(url: str) -> str:
    """The URL as logged: without user info (a secret never goes into a URL, but a caller might)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")).geturl()
    return url


__all__ = ["FetchPolicy", "MalformedPage", "Page", "PageFetcher", "PageUnavailable", "RefusedUrl", "build_client", "origin", "retry_after_s"]
