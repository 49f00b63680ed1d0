"""Request limits: a rate limit per API key (Redis, fixed one-minute windows) and a body size cap.

Rate limit: each key has `CAIRN_RATE_LIMIT_PER_MINUTE` requests per calendar minute (a key may
carry its own `rate_limit_per_minute`); the counter `{prefix}:ratelimit:{tenant}:{key id}:{minute}`
is one INCR per request, so every gateway process shares it. Over the limit: 429 with
`Retry-After` (seconds to the next window). If Redis does not answer, requests are let through
(deliberately: the limit protects capacity, it is not a security boundary), counted as
`cairn_gateway_dependency_fallbacks_total{dependency="redis",use="rate_limit"}` and logged at most
once a minute (degraded.py).

Body size: a declared `Content-Length` over `CAIRN_MAX_BODY_BYTES` is refused at once with 413;
a body without one (chunked) is read up to the limit and refused as soon as it passes it, before
any route sees it.
"""

import json
import logging
import math
import time

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cairn_gateway.auth import Principal
from cairn_gateway.degraded import REDIS_UNAVAILABLE, fell_back
from cairn_gateway.errors import RateLimited
from cairn_gateway.problems import PROBLEM_MEDIA_TYPE, problem_body

logger = logging.getLogger(__name__)

WINDOW_S = 60


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str, per_minute: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._per_minute = per_minute

    async def check(self, principal: Principal) -> None:
        """Count one request of the principal's key; raises `RateLimited` (with the seconds to the
        next window) over its limit. Without Redis, lets it through (counted, logged sparingly)."""
        limit = principal.rate_limit_per_minute if principal.rate_limit_per_minute is not None else self._per_minute
        if limit <= 0:
            return
        now = time.time()
        window = int(now // WINDOW_S)
        key = f"{self._prefix}:ratelimit:{principal.tenant}:{principal.key_id}:{window}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S * 2)
                count, _ = await pipe.execute()
        except REDIS_UNAVAILABLE as error:
            fell_back("redis", "rate_limit", error, "requests are let through without the rate limit")
            return
        if int(count) > limit:
            retry_after = max(1, math.ceil((window + 1) * WINDOW_S - now))
            raise RateLimited(
                f"rate limit of {limit} requests per minute reached for this API key; retry in {retry_after} s", retry_after
            )


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False
            if too_large:
                await self._refuse(send)
                return
        if declared is None and scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # Read the body here (bounded), then hand it on: a streamed body is cut at the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            problem_body(413, f"request body larger than the limit of {self.max_bytes} bytes (CAIRN_MAX_BODY_BYTES)", ["body"])
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
