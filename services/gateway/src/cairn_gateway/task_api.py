"""Wiring of the task API (issue 5) into the gateway app: keys, limits, `/v1` routers, errors.

`install_task_api` runs when the app is built, `start_task_api` in its lifespan once the
connections exist.
"""

import logging

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pymongo.asynchronous.database import AsyncDatabase

from cairn_gateway.auth import KeyVerifier
from cairn_gateway.jobs_api import router as jobs_router
from cairn_gateway.jobs_v1 import JobDirectory, backfill_created_at_ms
from cairn_gateway.joblock import DuplicateJob, JobLocks
from cairn_gateway.keys_api import router as keys_router
from cairn_gateway.limits import BodySizeLimit, RateLimiter
from cairn_gateway.problems import AUTH_RESPONSES, install_problem_handlers
from cairn_gateway.schedules_api import router as schedules_router
from cairn_gateway.schedules import ScheduleService
from cairn_gateway.settings import GatewaySettings
from cairn_runtime.amqp import Publisher

logger = logging.getLogger(__name__)


def job_locks(settings: GatewaySettings, cache: aioredis.Redis, db: AsyncDatabase) -> JobLocks:
    return JobLocks(cache, settings.redis_prefix, settings.job_lock_ttl_s, db)


def install_task_api(app: FastAPI, settings: GatewaySettings) -> None:
    for router in (jobs_router, schedules_router, keys_router):
        app.include_router(router, responses=AUTH_RESPONSES)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_problem_handlers(app)

    @app.exception_handler(DuplicateJob)
    async def _duplicate(_: Request, error: DuplicateJob) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(error), "loc": ["body"]})


async def start_task_api(
    app: FastAPI, settings: GatewaySettings, db: AsyncDatabase, cache: aioredis.Redis, publisher: Publisher
) -> None:
    app.state.mongo_db = db
    app.state.keys = KeyVerifier(db, settings.auth_cache_ttl_s)
    app.state.rate_limiter = RateLimiter(cache, settings.redis_prefix, settings.rate_limit_per_minute)
    locks = getattr(app.state.jobs, "locks", None)
    app.state.job_directory = JobDirectory(db, publisher, cache, settings.redis_prefix, settings.result_ttl_s, locks)
    app.state.schedules = ScheduleService(db, publisher, app.state.jobs)
    filled = await backfill_created_at_ms(db)
    if filled:
        logger.info("created_at_ms added to %d jobs recorded before it existed", filled)
