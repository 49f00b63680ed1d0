"""`cairn-scheduler`: wires settings, MongoDB, RabbitMQ and the handlers, then runs until SIGTERM."""

import asyncio
import logging

from cairn_contracts.messages import ShardFinished, StartJob
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_EVENTS
from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_runtime.consumer import ContractConsumer
from cairn_runtime.instrumentation import instrument_celery
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.service import run_service
from cairn_scheduler.control import job_lock_release, start_control
from cairn_scheduler.dispatch import CeleryDispatcher
from cairn_scheduler.gauges import GaugeCollector
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.maintenance import Maintenance
from cairn_scheduler.reaper import LeaseReaper
from cairn_scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)


async def run(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    mongo = async_client(settings.mongodb_uri)
    db = mongo[settings.mongodb_database]
    await ensure_indexes(db)
    connection = await connect(settings.amqp_url, "cairn-scheduler")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queues = await declare_topology(channel)
        publisher = await Publisher.open(connection, settings.publish_timeout_s)
        dispatcher = CeleryDispatcher.for_broker(settings.amqp_url)
        scheduler = JobScheduler(db, dispatcher, locks=job_lock_release(settings))
        common = {"service": settings.service_name, "publisher": publisher}
        await ContractConsumer(queue=queues[QUEUE_SCHEDULER_COMMANDS], model=StartJob, handler=scheduler.start_job, **common).start()
        await ContractConsumer(queue=queues[QUEUE_SCHEDULER_EVENTS], model=ShardFinished, handler=scheduler.shard_finished, **common).start()
        maintenance = asyncio.create_task(
            Maintenance(
                scheduler,
                publisher,
                LeaseReaper(db, dispatcher),
                relay_after_s=settings.relay_after_s,
                redispatch_after_s=settings.redispatch_after_s,
            ).run_forever(settings.reconcile_interval_s)
        )
        gauges = asyncio.create_task(GaugeCollector(db, connection).run_forever(settings.gauges_interval_s))
        control = await start_control(settings, scheduler, queues, publisher)  # cancel, schedules
        logger.info("scheduler consuming %s and %s", QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_EVENTS)
        await stop.wait()
        maintenance.cancel()
        gauges.cancel()
        await control.stop()
    finally:
        await connection.close()
        await mongo.close()


def main() -> None:
    settings = SchedulerSettings()
    # Shard tasks are sent through Celery: trace context and enqueue time travel with them.
    run_service(settings, lambda stop: run(settings, stop), instrument=instrument_celery)


if __name__ == "__main__":
    main()
