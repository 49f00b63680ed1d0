"""`cairn-scheduler`: wires settings, MongoDB, RabbitMQ and the handlers, then runs until SIGTERM."""

import asyncio
import contextlib
import functools
import logging

import redis.asyncio as aioredis

from cairn_contracts.messages import CancelJob, ShardFinished, StartJob
from cairn_contracts.topology import QUEUE_INGEST, QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_CONTROL, QUEUE_SCHEDULER_EVENTS
from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_runtime.celery_config import ShardTaskSender
from cairn_runtime.consumer import ContractConsumer
from cairn_runtime.instrumentation import instrument_celery
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.service import run_service
from cairn_scheduler.cancel import Canceller
from cairn_scheduler.gauges import GaugeCollector, QueueCounts
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.locks import JobLockRelease
from cairn_scheduler.maintenance import Maintenance
from cairn_scheduler.reaper import LeaseReaper, LostTaskWatch
from cairn_scheduler.schedules import ScheduleFirer
from cairn_scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)


async def run(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    mongo = async_client(settings.mongodb_uri)
    db = mongo[settings.mongodb_database]
    await ensure_indexes(db)
    locks = JobLockRelease(aioredis.Redis.from_url(settings.redis_url), settings.redis_prefix)
    connection = await connect(settings.amqp_url, "cairn-scheduler")
    loops: list[asyncio.Task] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queues = await declare_topology(channel)
        publisher = await Publisher.open(connection, settings.publish_timeout_s)
        dispatcher = ShardTaskSender.for_broker(settings.amqp_url, "cairn-scheduler")
        scheduler = JobScheduler(db, dispatcher, locks=locks)
        canceller = Canceller(scheduler, settings.result_ttl_s)
        common = {"service": settings.service_name, "publisher": publisher}
        await ContractConsumer(queue=queues[QUEUE_SCHEDULER_COMMANDS], model=StartJob, handler=scheduler.start_job, **common).start()
        await ContractConsumer(queue=queues[QUEUE_SCHEDULER_EVENTS], model=ShardFinished, handler=scheduler.shard_finished, **common).start()
        await ContractConsumer(queue=queues[QUEUE_SCHEDULER_CONTROL], model=CancelJob, handler=canceller.handle, **common).start()
        ingest_counts = QueueCounts(connection)
        maintenance = Maintenance(
            scheduler,
            publisher,
            LeaseReaper(db, dispatcher),
            relay_after_s=settings.relay_after_s,
            redispatch_after_s=settings.redispatch_after_s,
            ingest_ready=functools.partial(ingest_counts.ready, QUEUE_INGEST),
            lost_tasks=LostTaskWatch(passes_needed=settings.lost_task_passes),
        )
        loops = [
            asyncio.create_task(maintenance.run_forever(settings.reconcile_interval_s)),
            asyncio.create_task(maintenance.dispatch_retries_forever(settings.retry_poll_max_s)),
            asyncio.create_task(canceller.run_forever(settings.reconcile_interval_s)),
            asyncio.create_task(ScheduleFirer(db, publisher).run_forever(settings.schedule_tick_s)),
            asyncio.create_task(GaugeCollector(db, connection).run_forever(settings.gauges_interval_s)),
        ]
        logger.info(
            "scheduler consuming %s, %s and %s; firing schedules every %.1f s",
            QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_EVENTS, QUEUE_SCHEDULER_CONTROL, settings.schedule_tick_s,
        )
        await stop.wait()
    finally:
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await connection.close()
        await locks.close()
        await mongo.close()


def main() -> None:
    settings = SchedulerSettings()
    # Shard tasks are sent through Celery: trace context and enqueue time travel with them.
    run_service(settings, lambda stop: run(settings, stop), instrument=instrument_celery)


if __name__ == "__main__":
    main()
