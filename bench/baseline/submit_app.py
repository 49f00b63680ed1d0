"""Baseline of scenario 3: the gateway's own app, with a submit that only publishes, unconfirmed.

BENCHMARK ONLY. It is the production gateway (same FastAPI app, routes, validation, middleware,
error handlers and instrumentation, built by `cairn_gateway.app.create_app` and started as
`cairn_gateway.main` starts it) with one difference: `POST /task/start` publishes the StartJob
command on a channel *without* publisher confirms and writes nothing to MongoDB. The difference
between the two is what durability costs: the MongoDB insert, the broker's confirm, and the
`command_published_at` update. Nothing here is a mode of the production gateway.

Run: python -m bench.baseline.submit_app   (same CAIRN_* settings as the gateway)
"""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import uvicorn
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.topology import EXCHANGE_COMMANDS, ROUTING_START_JOB
from cairn_gateway.app import create_app
from cairn_gateway.jobs import Submission
from cairn_gateway.settings import GatewaySettings
from cairn_runtime.amqp import message_headers
from cairn_runtime.log import configure_logging
from cairn_runtime.tracing import setup_tracing


class PublishOnlyJobs:
    """Stands in for the gateway's JobService on the submit route: publish, no confirm, no store."""

    def __init__(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        self._exchange = exchange

    async def submit(self, spec: Any, tenant: str, *_: Any, **__: Any) -> Submission:
        job_id = uuid.uuid4().hex
        command = StartJob(job_id=job_id, tenant=tenant, spec=spec)
        headers = message_headers(command, job_id)
        await self._exchange.publish(
            aio_pika.Message(
                command.model_dump_json().encode(),
                headers=headers,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=int(spec.priority),
                message_id=str(uuid.uuid4()),
                correlation_id=job_id,
            ),
            ROUTING_START_JOB,
        )
        return Submission(job_id, JobState.PENDING, created=True)


def build(settings: GatewaySettings) -> FastAPI:
    app = create_app(settings)
    production_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        async with production_lifespan(app_):
            connection = await aio_pika.connect_robust(settings.amqp_url, client_properties={"connection_name": "bench-submit-baseline"})
            channel = await connection.channel(publisher_confirms=False)
            exchange = await channel.get_exchange(EXCHANGE_COMMANDS, ensure=False)
            app_.state.jobs = PublishOnlyJobs(exchange)
            try:
                yield
            finally:
                await connection.close()

    app.router.lifespan_context = lifespan
    return app


def main() -> None:
    settings = GatewaySettings(service_name="bench-submit-baseline")
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    setup_tracing(settings.service_name, settings.trace_exporter, trace_file=settings.trace_file, otlp_endpoint=settings.otlp_endpoint)
    app = build(settings)
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,metrics")
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
