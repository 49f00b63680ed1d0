"""`cairn-dlq-handler`: records every dead-lettered message in task_errors, acking only after."""

import asyncio
import logging

from aio_pika.abc import AbstractIncomingMessage

from cairn_contracts.store import JOBS, TASK_ERRORS
from cairn_contracts.topology import QUEUE_DLQ
from cairn_dlq_handler.commands import start_replays
from cairn_dlq_handler.recorder import ErrorRecorder
from cairn_dlq_handler.settings import DlqSettings
from cairn_runtime.amqp import connect, declare_topology
from cairn_runtime.consumer import consuming
from cairn_runtime.instrumentation import instrument_celery
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.service import run_service
from cairn_runtime.payloads import RawPayloads

logger = logging.getLogger(__name__)

REQUEUE_DELAY_S = 1.0


async def run(settings: DlqSettings, stop: asyncio.Event) -> None:
    mongo = async_client(settings.mongodb_uri)
    db = mongo[settings.mongodb_database]
    await ensure_indexes(db)
    recorder = ErrorRecorder(
        db[TASK_ERRORS],
        jobs=db[JOBS],
        payloads=RawPayloads(db),
        raw_payload_threshold_bytes=settings.raw_payload_threshold_bytes,
    )
    connection = await connect(settings.amqp_url, "cairn-dlq-handler")

    async def on_message(message: AbstractIncomingMessage) -> None:
        with consuming(message, QUEUE_DLQ):  # the dead letter's trace goes on here
            try:
                await recorder.record(message)
            except Exception:
                logger.exception("could not record a dead letter; requeued")
                await asyncio.sleep(REQUEUE_DELAY_S)
                await message.nack(requeue=True)
            else:
                await message.ack()

    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queues = await declare_topology(channel)
        await queues[QUEUE_DLQ].consume(on_message)
        logger.info("dlq handler consuming %s", QUEUE_DLQ)
        replays = await start_replays(settings, db, connection, queues)  # replay/discard commands
        await stop.wait()
        await replays.stop()
    finally:
        await connection.close()
        await mongo.close()


def main() -> None:
    settings = DlqSettings()
    # Shard tasks are sent through Celery: trace context and enqueue time travel with them.
    run_service(settings, lambda stop: run(settings, stop), instrument=instrument_celery)


if __name__ == "__main__":
    main()
