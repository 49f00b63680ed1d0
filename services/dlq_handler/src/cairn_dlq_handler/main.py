"""`cairn-dlq-handler`: records every dead-lettered message in task_errors (acking only after),
carries out replay/discard commands, and settles replays from shard events and periodically.

Its handlers table (queue, message model, handler) and its periodic table are the two lists in
`run`; `cairn_runtime.service.serve` consumes and runs them. The handling logic lives in
recorder.py (dead letters) and replay.py (commands, shard events, settling).
"""

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from aio_pika import IncomingMessage

from cairn_contracts.messages import DeadLetterCommand, ShardFinished
from cairn_contracts.store import JOBS, TASK_ERRORS
from cairn_contracts.topology import QUEUE_DLQ, QUEUE_DLQ_COMMANDS, QUEUE_DLQ_EVENTS
from cairn_dlq_handler.recorder import ErrorRecorder
from cairn_dlq_handler.replay import DeadLetterCommands
from cairn_dlq_handler.settings import DlqSettings
from cairn_dlq_handler.status_cache import RedisStatusCache
from cairn_runtime import tally
from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_runtime.celery_config import ShardTaskSender
from cairn_runtime.consumer import Subscription
from cairn_runtime.instrumentation import instrument_celery
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.payloads import RawPayloads
from cairn_runtime.service import Every, run_service, serve

logger = logging.getLogger(__name__)


async def run(settings: DlqSettings, stop: asyncio.Event) -> None:
    mongo = async_client(settings.mongodb_uri)
    db = mongo[settings.mongodb_database]
    await ensure_indexes(db)
    await tally.migrate_legacy_ledgers(db)  # a replay counts: never into a job whose ledger is not moved yet
    recorder = ErrorRecorder(
        db[TASK_ERRORS],
        jobs=db[JOBS],
        payloads=RawPayloads(db),
        raw_payload_threshold_bytes=settings.raw_payload_threshold_bytes,
    )
    cache = RedisStatusCache(aioredis.Redis.from_url(settings.redis_url), settings.redis_prefix)
    commands = DeadLetterCommands(db, ShardTaskSender.for_broker(settings.amqp_url, "cairn-dlq-handler"), cache)

    async def settle() -> None:
        # The safety net under the shard events: settle every replay whose shard has finished.
        if settled := await commands.settle_all():
            logger.info("settled %d replays", settled)

    connection = await connect(settings.amqp_url, "cairn-dlq-handler")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queues = await declare_topology(channel)
        publisher = await Publisher.open(connection, settings.publish_timeout_s)
        handlers: list[Subscription[Any]] = [
            # cairn.dlq carries Cairn's DeadLetter envelopes and raw messages the broker
            # dead-lettered alike: the recorder gets each message undecoded and never
            # dead-letters it again (a failure requeues it).
            Subscription(QUEUE_DLQ, IncomingMessage, recorder.record),
            Subscription(QUEUE_DLQ_COMMANDS, DeadLetterCommand, commands.handle),
            Subscription(QUEUE_DLQ_EVENTS, ShardFinished, commands.shard_finished),
        ]
        periodic = [Every(settings.settle_interval_s, settle, "settling replays")]
        await serve(stop, handlers, periodic, service=settings.service_name, queues=queues, publisher=publisher)
    finally:
        await connection.close()
        await cache.close()
        await mongo.close()


def main() -> None:
    settings = DlqSettings()
    # Shard tasks are sent through Celery: trace context and enqueue time travel with them.
    run_service(settings, lambda stop: run(settings, stop), instrument=instrument_celery)


if __name__ == "__main__":
    main()
