"""The gateway's app factory, and only wiring: settings → connections → services → routers.

- connections: MongoDB, Redis (`redis_client`), the RabbitMQ publisher (connects in the
  background, so the gateway starts and answers without the broker: commands it cannot publish
  are relayed by the scheduler);
- services (the logic; raise domain errors only): `JobService` (jobs.py), `ScheduleService`
  (schedules.py), `TenantService` (tenants.py: quotas, namespaces, source grants), `DeadLetterService` (dlq.py), `KeyVerifier` and `KeyService` (auth.py), `RateLimiter` and
  `JobLocks`, put on `app.state` where api/deps.py hands them to the routes;
- routers (api/routes/: tasks, jobs, schedules, keys, tenants, dlq, ops), the body size limit and HTTP
  metrics middlewares, and problems.py's handlers: every error answers one Problem body.

Dependencies down (docs/design.md, "Dependencies down"): Redis is a cache and a guard
(degraded.py); without MongoDB, the record, a request answers 503.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from prometheus_client import make_asgi_app

from cairn_contracts.tenancy import TenantQuotas
from cairn_gateway.api.deps import require_scope
from cairn_gateway.api.routes import chains, dlq, jobs, keys, ops, pipelines, results, schedules, tasks, tenants, workers
from cairn_gateway.auth import KeyService, KeyVerifier
from cairn_gateway.catalog import PipelineCatalog
from cairn_gateway.chains import ChainService
from cairn_gateway.console import install_console
from cairn_gateway.dlq import DeadLetterService
from cairn_gateway.http_metrics import HttpMetricsMiddleware
from cairn_gateway.joblock import JobLocks
from cairn_gateway.jobs import JobService
from cairn_gateway.limits import BodySizeLimit, RateLimiter
from cairn_gateway.problems import AUTH_RESPONSES, UNAVAILABLE_RESPONSES, install_problem_handlers
from cairn_gateway.results import ResultService
from cairn_gateway.schedules import ScheduleService
from cairn_gateway.settings import GatewaySettings
from cairn_gateway.tenants import TenantService
from cairn_gateway.workers import HeartbeatMonitor, WorkerControl
from cairn_runtime.amqp import BackgroundPublisher
from cairn_runtime.celery_config import control_app
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


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections.
        mongo = async_client(
            settings.mongodb_uri,
            server_selection_timeout_ms=settings.mongodb_server_selection_timeout_ms,
            operation_timeout_ms=settings.mongodb_operation_timeout_ms,
        )
        db = mongo[settings.mongodb_database]
        await ensure_indexes(db)
        cache = redis_client(settings)
        publisher = BackgroundPublisher(
            settings.amqp_url, "cairn-gateway", settings.publish_timeout_s, retry_max_s=settings.broker_retry_max_s
        )
        await publisher.start()  # connected now if the broker answers, else in the background
        app.state.mongo = mongo
        app.state.cache = cache
        app.state.publisher = publisher
        # Services.
        tenant_service = TenantService(
            db,
            TenantQuotas(
                max_running_jobs=settings.tenant_max_running_jobs,
                max_shards_per_job=settings.tenant_max_shards_per_job,
                max_records_per_job=settings.tenant_max_records_per_job,
            ),
        )
        app.state.tenants = tenant_service
        job_service = JobService(
            db=db,
            publisher=publisher,
            cache=cache,
            cache_prefix=settings.redis_prefix,
            cache_ttl_s=settings.status_cache_ttl_s,
            result_ttl_s=settings.result_ttl_s,
            locks=JobLocks(cache, settings.redis_prefix, settings.job_lock_ttl_s, db),
            tenants=tenant_service,
        )
        app.state.jobs = job_service
        app.state.schedules = ScheduleService(db, publisher, job_service)
        app.state.chains = ChainService(db, job_service)
        app.state.pipelines = PipelineCatalog(db)
        app.state.results = ResultService(db, job_service)
        app.state.dead_letters = DeadLetterService(db=db, publisher=publisher, payloads=RawPayloads(db), tenants=tenant_service)
        app.state.key_verifier = KeyVerifier(db, settings.auth_cache_ttl_s)
        app.state.keys = KeyService(db, app.state.key_verifier)
        app.state.rate_limiter = RateLimiter(cache, settings.redis_prefix, settings.rate_limit_per_minute)
        celery = control_app(settings.amqp_url, "cairn-gateway")
        heartbeats = HeartbeatMonitor(celery) if settings.worker_heartbeats else None
        if heartbeats is not None:
            heartbeats.start()
        app.state.workers = WorkerControl(celery, db, publisher, settings.worker_control_timeout_s, heartbeats)
        try:
            yield
        finally:
            if heartbeats is not None:
                heartbeats.stop()
            await publisher.close()
            await cache.aclose()
            await mongo.close()

    app = FastAPI(
        title="Cairn gateway",
        version="0.1.0",
        description="Start long, resumable ingest jobs and follow them. Jobs run in the background; no call waits for one.",
        lifespan=lifespan,
    )
    # Routers.
    responses = {**AUTH_RESPONSES, **UNAVAILABLE_RESPONSES}
    for router in (tasks.router, jobs.router, chains.router, pipelines.router, schedules.router, keys.router, results.router, tenants.router):
        app.include_router(router, responses=responses)
    app.include_router(dlq.router, dependencies=[Depends(require_scope("admin"))], responses=responses)
    app.include_router(workers.router, responses=responses)  # operator scope, per route (CLI+Workers)
    app.include_router(ops.router)
    install_console(app)  # the web console, /console (console/): a client of the routes above
    app.mount("/metrics", make_asgi_app())  # /metrics/ as before (ops.py answers exactly /metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware)
    install_problem_handlers(app)
    return app
