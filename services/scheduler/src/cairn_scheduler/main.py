"""`cairn-scheduler`: wires settings, MongoDB, RabbitMQ and the handlers, then runs until SIGTERM.

Its handlers table (queue, message model, handler) and its periodic table (interval, pass) are
the two lists in `run`; `cairn_runtime.service.serve` consumes and runs them.
"""

import asyncio
import functools
import logging
from typing import Any

import httpx
import redis.asyncio as aioredis

from cairn_contracts.messages import CancelJob, ShardFinished, StartJob
from cairn_contracts.tenancy import TenantQuotas
from cairn_contracts.topology import QUEUE_INGEST, QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_CONTROL, QUEUE_SCHEDULER_EVENTS
from cairn_runtime import tally
from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_runtime.celery_config import ShardTaskSender
from cairn_runtime.consumer import Batched, Subscription
from cairn_runtime.instrumentation import instrument_celery
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.service import Every, run_service, serve
from cairn_scheduler.cancel import Canceller
from cairn_scheduler.fairness import FairDispatch
from cairn_scheduler.gauges import GaugeCollector, QueueCounts
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.locks import JobLockRelease
from cairn_scheduler.maintenance import Maintenance
from cairn_scheduler.reaper import LeaseReaper, LostTaskWatch
from cairn_scheduler.schedules import ScheduleFirer
from cairn_scheduler.settings import SchedulerSettings
from cairn_scheduler.webhooks import WebhookDeliverer, WebhookPolicy
from cairn_scheduler.workflows import DependencyRelease

logger = logging.getLogger(__name__)


async def run(settings: SchedulerSettings, stop: asyncio.Event) -> None:
    mongo = async_client(settings.mongodb_uri)
    db = mongo[settings.mongodb_database]
    await ensure_indexes(db)
    await tally.migrate_legacy_ledgers(db)  # before anything is counted
    locks = JobLockRelease(aioredis.Redis.from_url(settings.redis_url), settings.redis_prefix)
    connection = await connect(settings.amqp_url, "cairn-scheduler")
    # Webhook deliveries: no redirects (SSRF), the proxy if one is configured.
    webhook_client = httpx.AsyncClient(follow_redirects=False, proxy=settings.webhook_proxy, trust_env=False)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queues = await declare_topology(channel)
        publisher = await Publisher.open(connection, settings.publish_timeout_s)
        dispatcher = ShardTaskSender.for_broker(settings.amqp_url, "cairn-scheduler")
        defaults = TenantQuotas(
            max_running_jobs=settings.tenant_max_running_jobs,
            max_shards_per_job=settings.tenant_max_shards_per_job,
            max_records_per_job=settings.tenant_max_records_per_job,
        )
        dependents = DependencyRelease(db, publisher, locks, defaults=defaults)
        fair = FairDispatch(
            db, dispatcher, settings.tenant_max_in_flight_shards, settings.max_in_flight_shards, settings.fair_refill_interval_s,
            max_bundle_shards=settings.max_bundle_shards,
        )
        scheduler = JobScheduler(
            db, dispatcher, locks=locks, dependents=dependents, fair=fair, snapshot_every_s=settings.reconcile_interval_s,
            max_bundle_shards=settings.max_bundle_shards,
        )
        canceller = Canceller(scheduler, settings.result_ttl_s)
        maintenance = Maintenance(
            scheduler,
            publisher,
            LeaseReaper(db, dispatcher),
            relay_after_s=settings.relay_after_s,
            redispatch_after_s=settings.redispatch_after_s,
            ingest_ready=functools.partial(QueueCounts(connection).ready, QUEUE_INGEST),
            lost_tasks=LostTaskWatch(passes_needed=settings.lost_task_passes),
        )
        handlers: list[Subscription[Any]] = [
            Subscription(QUEUE_SCHEDULER_COMMANDS, StartJob, scheduler.start_job),
            Subscription(QUEUE_SCHEDULER_EVENTS, ShardFinished, Batched(scheduler.shards_finished)),
            Subscription(QUEUE_SCHEDULER_CONTROL, CancelJob, canceller.handle),
        ]
        periodic = [
            Every(settings.reconcile_interval_s, maintenance.run_pass, "maintenance pass"),
            # Sleeps until the next retry is due (the pass returns that delay), at most this long.
            Every(settings.retry_poll_max_s, functools.partial(maintenance.dispatch_due_retries, settings.retry_poll_max_s), "due-retry dispatch"),
            Every(settings.reconcile_interval_s, canceller.run_pass, "cancel sweep"),
            Every(settings.reconcile_interval_s, dependents.sweep, "dependency sweep"),
            Every(settings.fair_dispatch_interval_s, fair.run_pass, "fair dispatch"),
            Every(settings.schedule_tick_s, ScheduleFirer(db, publisher, defaults).tick, "schedule tick"),
            Every(settings.gauges_interval_s, GaugeCollector(db, connection).collect_once, "gauge collection"),
            Every(settings.webhook_poll_s, WebhookDeliverer(db, webhook_client, webhook_policy(settings)).run_pass, "webhook delivery"),
        ]
        try:
            await serve(stop, handlers, periodic, service=settings.service_name, queues=queues, publisher=publisher)
        finally:
            await fair.close()  # a refill put off to later must not outlive its connections
    finally:
        await webhook_client.aclose()
        await connection.close()
        await locks.close()
        await mongo.close()


def webhook_policy(settings: SchedulerSettings) -> WebhookPolicy:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret is not None else None
    return WebhookPolicy(
        secret=secret or None,
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        base_delay_s=settings.webhook_base_delay_s,
        max_delay_s=settings.webhook_max_delay_s,
        allow_private_networks=settings.webhook_allow_private_networks,
    )


def main() -> None:
    settings = SchedulerSettings()
    # Shard tasks are sent through Celery: trace context and enqueue time travel with them.
    run_service(settings, lambda stop: run(settings, stop), instrument=instrument_celery)


if __name__ == "__main__":
    main()
