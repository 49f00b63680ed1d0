"""The gateway's app factory: settings → connections → services → routes, error answers, limits.

Dependencies down (docs/design.md, "Dependencies down"): the gateway starts and answers without
RabbitMQ (its publisher connects in the background; commands it cannot publish are relayed by the
scheduler) and without Redis (a cache and a guard: degraded.py); without MongoDB, the record, a
request answers 503. `/healthz` says the process is alive; `/readyz` whether each dependency answers.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from cairn_gateway.auth import KeyVerifier, require_scope
from cairn_gateway.dlq import DeadLetterService
from cairn_gateway.dlq_api import router as dlq_router
from cairn_gateway.http_metrics import HttpMetricsMiddleware, metrics_page
from cairn_gateway.job_directory import JobDirectory
from cairn_gateway.joblock import JobLocks
from cairn_gateway.jobs import JobService
from cairn_gateway.jobs_api import router as jobs_router
from cairn_gateway.keys_api import router as keys_router
from cairn_gateway.limits import BodySizeLimit, RateLimiter
from cairn_gateway.problems import AUTH_RESPONSES, UNAVAILABLE_RESPONSES, install_problem_handlers, install_unavailable_handler
from cairn_gateway.schedules import ScheduleService
from cairn_gateway.schedules_api import router as schedules_router
from cairn_gateway.settings import GatewaySettings
from cairn_gateway.tasks_api import router as tasks_router
from cairn_runtime.amqp import BackgroundPublisher
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.payloads import RawPayloads

logger = logging.getLogger(__name__)


def redis_client(settings: GatewaySettings) -> aioredis.Redis:
    """The gateway's Redis client: every call bounded by `redis_timeout_s` (connect and read, so a
    hung Redis counts as down), and a pool of `redis_max_connections` that a burst waits for (up to
    `redis_pool_timeout_s`) instead of failing: a busy Redis is not a Redis down."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


READY_CHECK_TIMEOUT_S = 2.0


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongo = async_client(settings.mongodb_uri, server_selection_timeout_ms=settings.mongodb_server_selection_timeout_ms)
        db = mongo[settings.mongodb_database]
        await ensure_indexes(db)
        cache = redis_client(settings)
        publisher = BackgroundPublisher(
            settings.amqp_url, "cairn-gateway", settings.publish_timeout_s, retry_max_s=settings.broker_retry_max_s
        )
        await publisher.start()  # connected now if the broker answers, else in the background
        locks = JobLocks(cache, settings.redis_prefix, settings.job_lock_ttl_s, db)
        jobs = JobService(
            db=db,
            publisher=publisher,
            cache=cache,
            cache_prefix=settings.redis_prefix,
            cache_ttl_s=settings.status_cache_ttl_s,
            locks=locks,
            sources=mongo[settings.source_database] if settings.source_database else None,
        )
        app.state.mongo = mongo
        app.state.cache = cache
        app.state.publisher = publisher
        app.state.mongo_db = db
        app.state.jobs = jobs
        app.state.job_directory = JobDirectory(db, publisher, cache, settings.redis_prefix, settings.result_ttl_s, locks)
        app.state.schedules = ScheduleService(db, publisher, jobs)
        app.state.dead_letters = DeadLetterService(db=db, publisher=publisher, payloads=RawPayloads(db))
        app.state.keys = KeyVerifier(db, settings.auth_cache_ttl_s)
        app.state.rate_limiter = RateLimiter(cache, settings.redis_prefix, settings.rate_limit_per_minute)
        try:
            yield
        finally:
            await publisher.close()
            await cache.aclose()
            await mongo.close()

    app = FastAPI(
        title="Cairn gateway",
        version="0.1.0",
        description="Start long, resumable ingest jobs and follow them. Jobs run in the background; no call waits for one.",
        lifespan=lifespan,
    )
    responses = {**AUTH_RESPONSES, **UNAVAILABLE_RESPONSES}
    for router in (tasks_router, jobs_router, schedules_router, keys_router):
        app.include_router(router, responses=responses)
    app.include_router(dlq_router, dependencies=[Depends(require_scope("admin"))], responses=responses)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware)
    app.add_route("/metrics", metrics_page, include_in_schema=False)  # exactly /metrics, no redirect
    app.mount("/metrics", make_asgi_app())  # /metrics/ as before
    install_problem_handlers(app)
    install_unavailable_handler(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Liveness: the process serves HTTP (200 `{"status": "ok"}`); it checks no dependency, so a
        supervisor never restarts a gateway for an outage a restart cannot fix."""
        return JSONResponse(content={"status": "ok"})

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "A dependency does not answer (the body names it)"}})
    async def readyz() -> JSONResponse:
        """Readiness: 200 if MongoDB, RabbitMQ and Redis all answer, else 503. Body:
        `{"status": "ready" | "unavailable", "dependencies": {"mongodb" | "rabbitmq" | "redis":
        {"status": "ok" | "unavailable", "error": str (when unavailable)}}}`. Each check is
        bounded by READY_CHECK_TIMEOUT_S. Without RabbitMQ or Redis the gateway still accepts
        jobs (relayed later; no cache, rate limit or job lock), without MongoDB it answers 503."""
        results = await asyncio.gather(
            _check(app.state.mongo.admin.command("ping")),
            _check(_broker_connected(app.state.publisher)),
            _check(app.state.cache.ping()),
        )
        dependencies = dict(zip(("mongodb", "rabbitmq", "redis"), results, strict=True))
        ready = all(d["status"] == "ok" for d in dependencies.values())
        return JSONResponse(
            status_code=200 if ready else 503,
            content={"status": "ready" if ready else "unavailable", "dependencies": dependencies},
        )

    return app


async def _broker_connected(publisher: BackgroundPublisher) -> None:
    if not publisher.connected:
        raise ConnectionError("not connected to RabbitMQ (reconnecting in the background)")


async def _check(probe: Awaitable[object]) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await probe
    except Exception as error:  # any failure of a probe means "not ready", with its reason
        return {"status": "unavailable", "error": f"{type(error).__name__}: {error}"[:300]}
    return {"status": "ok"}
