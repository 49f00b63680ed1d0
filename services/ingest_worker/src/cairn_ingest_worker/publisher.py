"""The worker's confirmed publisher: Celery's own broker connection (kombu, confirm_publish on),
so events and dead letters leave through the same connection pool as the task retries. Like the
asyncio services' `Publisher.publish`, it takes the route from the message (`message.route()`)."""

import logging

from celery import Celery
from kombu import Connection, Exchange, Queue

from cairn_contracts.messages import Message
from cairn_contracts.topology import EXCHANGES, QUEUES
from cairn_runtime.amqp import message_headers
from cairn_runtime.metrics import timed_publish
from cairn_runtime.tracing import producer_span

logger = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}


class BrokerPublisher:
    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, message: Message) -> None:
        """Publish `message` on its own route; returns once the broker confirmed it (kombu retries
        a lost connection per `_RETRY_POLICY`, then raises its connection error)."""
        route = message.route()
        # The producer span is current while the headers are built: they carry its trace context.
        with producer_span(route.exchange, route.routing_key, message), timed_publish(route.exchange):
            headers = message_headers(message, None)
            with self._app.producer_or_acquire() as producer:
                # With confirm_publish, this returns only once the broker has confirmed the message.
                producer.publish(
                    message.model_dump_json(),
                    exchange=route.exchange,
                    routing_key=route.routing_key,
                    headers=headers,
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    retry=True,
                    retry_policy=_RETRY_POLICY,
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
