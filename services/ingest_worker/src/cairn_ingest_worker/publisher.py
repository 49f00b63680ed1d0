"""The worker's confirmed publisher: Celery's own broker connection (kombu, confirm_publish on),
so events and dead letters leave through the same connection pool as the task retries."""

import logging

from celery import Celery
from kombu import Connection, Exchange, Queue

from cairn_contracts.messages import DeadLetter, Message
from cairn_contracts.topology import EXCHANGE_DLX, EXCHANGES, HEADER_SOURCE_QUEUE, QUEUES
from cairn_runtime.amqp import message_headers
from cairn_runtime.metrics import timed_publish
from cairn_runtime.tracing import producer_span

logger = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}


class BrokerPublisher:
    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, exchange: str, routing_key: str, message: Message, extra_headers: dict | None = None) -> None:
        # The producer span is current while the headers are built: they carry its trace context.
        with producer_span(exchange, routing_key, message), timed_publish(exchange):
            self._publish(exchange, routing_key, message, extra_headers)

    def _publish(self, exchange: str, routing_key: str, message: Message, extra_headers: dict | None) -> None:
        headers = message_headers(message.message_type, message.schema_version, None)
        headers.update(extra_headers or {})
        with self._app.producer_or_acquire() as producer:
            # With confirm_publish, this returns only once the broker has confirmed the message.
            producer.publish(
                message.model_dump_json(),
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                retry=True,
                retry_policy=_RETRY_POLICY,
            )

    def publish_dead_letter(self, dead_letter: DeadLetter) -> None:
        self.publish(
            EXCHANGE_DLX,
            dead_letter.source_queue,
            dead_letter,
            extra_headers={HEADER_SOURCE_QUEUE: dead_letter.source_queue},
        )


def declare_topology(connection: Connection) -> None:
    """The same layout the asyncio services declare, so the worker may start first."""
    channel = connection.default_channel
    exchanges = {spec.name: Exchange(spec.name, type=spec.type, durable=True) for spec in EXCHANGES}
    for exchange in exchanges.values():
        exchange(channel).declare()
    for spec in QUEUES:
        queue = Queue(spec.name, durable=True, queue_arguments=dict(spec.arguments) or None, no_declare=False)
        bound = queue(channel)
        bound.declare()
        for exchange_name, routing_key in spec.bindings:
            bound.bind_to(exchange=exchange_name, routing_key=routing_key)
