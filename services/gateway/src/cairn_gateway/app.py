"""The gateway's app factory: settings → connections → services → routes, error answers, limits."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from cairn_gateway.auth import KeyVerifier, require_scope
from cairn_gateway.dlq import DeadLetterService
from cairn_gateway.dlq_api import router as dlq_router
from cairn_gateway.http_metrics import HttpMetricsMiddleware
from cairn_gateway.job_directory import JobDirectory
from cairn_gateway.joblock import JobLocks
from cairn_gateway.jobs import JobService
from cairn_gateway.jobs_api import router as jobs_router
from cairn_gateway.keys_api import router as keys_router
from cairn_gateway.limits import BodySizeLimit, RateLimiter
from cairn_gateway.problems import AUTH_RESPONSES, install_problem_handlers
from cairn_gateway.schedules import ScheduleService
from cairn_gateway.schedules_api import router as schedules_router
from cairn_gateway.settings import GatewaySettings
from cairn_gateway.tasks_api import router as tasks_router
from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.payloads import RawPayloads

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongo = async_client(settings.mongodb_uri)
        db = mongo[settings.mongodb_database]
        await ensure_indexes(db)
        cache = aioredis.Redis.from_url(settings.redis_url)
        connection = await connect(settings.amqp_url, "cairn-gateway")
        async with connection.channel() as channel:
            await declare_topology(channel)
        publisher = await Publisher.open(connection, settings.publish_timeout_s)
        locks = JobLocks(cache, settings.redis_prefix, settings.job_lock_ttl_s, db)
        jobs = JobService(
            db=db,
            publisher=publisher,
            cache=cache,
            cache_prefix=settings.redis_prefix,
            cache_ttl_s=settings.status_cache_ttl_s,
            locks=locks,
        )
        app.state.mongo = mongo
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
            await connection.close()
            await cache.aclose()
            await mongo.close()

    app = FastAPI(
        title="Cairn gateway",
        version="0.1.0",
        description="Start long, resumable ingest jobs and follow them. Jobs run in the background; no call waits for one.",
        lifespan=lifespan,
    )
    for router in (tasks_router, jobs_router, schedules_router, keys_router):
        app.include_router(router, responses=AUTH_RESPONSES)
    app.include_router(dlq_router, dependencies=[Depends(require_scope("admin"))], responses=AUTH_RESPONSES)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware)
    app.mount("/metrics", make_asgi_app())
    install_problem_handlers(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        try:
            await app.state.mongo.admin.command("ping")
        except Exception as error:
            return JSONResponse(status_code=503, content={"status": "unavailable", "mongodb": str(error)})
        return JSONResponse(content={"status": "ok"})

    return app
