"""`cairn-dlq-handler`: records every dead-lettered message in task_errors, acking only after."""

import asyncio
import logging
import signal

from aio_pika.abc import AbstractIncomingMessage

from cairn_contracts.store import JOBS, TASK_ERRORS
from cairn_contracts.topology import QUEUE_DLQ
from cairn_dlq_handler.commands import start_replays
from cairn_dlq_handler.recorder import ErrorRecorder
from cairn_dlq_handler.settings import DlqSettings
from cairn_runtime.amqp import connect, declare_topology
from cairn_runtime.consumer import consuming
from cairn_runtime.instrumentation import instrument_celery, instrument_clients
from cairn_runtime.log import configure_logging
from cairn_runtime.metrics import serve_metrics
from cairn_runtime.mongo import async_client, ensure_indexes
from cairn_runtime.payloads import RawPayloads
from cairn_runtime.tracing import setup_tracing

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
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    setup_tracing(settings.service_name, settings.trace_exporter, trace_file=settings.trace_file, otlp_endpoint=settings.otlp_endpoint)
    instrument_clients()
    instrument_celery()  # replays are Celery tasks: trace context and enqueue time travel with them
    serve_metrics(settings.metrics_port, settings.metrics_host)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(_main())


if __name__ == "__main__":
    main()
