"""Wiring of the scheduler's task-API duties (issue 5): the cancel consumer and sweep, the
schedule firing loop, and the release of the gateway's job locks."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from aio_pika.abc import AbstractQueue

from cairn_contracts.messages import CancelJob
from cairn_contracts.topology import QUEUE_SCHEDULER_CONTROL
from cairn_runtime.amqp import Publisher
from cairn_runtime.consumer import ContractConsumer
from cairn_scheduler.cancel import Canceller
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.locks import JobLockRelease
from cairn_scheduler.schedules import ScheduleFirer
from cairn_scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)


@dataclass
class Control:
    tasks: list[asyncio.Task]
    locks: JobLockRelease | None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.locks is not None:
            await self.locks.close()


def job_lock_release(settings: SchedulerSettings) -> JobLockRelease:
    return JobLockRelease(aioredis.Redis.from_url(settings.redis_url), settings.redis_prefix)


async def start_control(
    settings: SchedulerSettings, scheduler: JobScheduler, queues: dict[str, AbstractQueue], publisher: Publisher
) -> Control:
    canceller = Canceller(scheduler, settings.result_ttl_s)
    await ContractConsumer(
        queue=queues[QUEUE_SCHEDULER_CONTROL], model=CancelJob, handler=canceller.handle, service=settings.service_name, publisher=publisher
    ).start()
    tasks = [
        asyncio.create_task(canceller.run_forever(settings.reconcile_interval_s)),
        asyncio.create_task(ScheduleFirer(scheduler.db, publisher).run_forever(settings.schedule_tick_s)),
    ]
    logger.info("scheduler consuming %s; firing schedules every %.1f s", QUEUE_SCHEDULER_CONTROL, settings.schedule_tick_s)
    locks = scheduler.locks if isinstance(scheduler.locks, JobLockRelease) else None
    return Control(tasks, locks)
