"""The worker's confirmed publisher: Celery's own broker connection (kombu, confirm_publish on),
so events and dead letters leave through the same connection pool as the task retries. Like the
asyncio services' `Publisher.publish`, it takes the route from the message (`message.route()`)."""

import logging
import time
from collections.abc import Sequence

import amqp
from amqp.exceptions import AMQPError, MessageNacked
from amqp.spec import Basic
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError

from cairn_contracts.messages import Message
from cairn_contracts.topology import EXCHANGES, QUEUES
from cairn_runtime.amqp import message_headers
from cairn_runtime.metrics import PUBLISH_FAILURES, PUBLISH_SECONDS, timed_publish
from cairn_runtime.tracing import producer_span

logger = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}
# How long `publish_all` waits for the broker's confirms of its messages before it gives up on the
# pipelined attempt and publishes them one by one (`publish`, with its retries).
CONFIRMS_TIMEOUT_S = 10.0


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

    def publish_all(self, messages: Sequence[Message]) -> None:
        """Publish `messages`, each on its own route, and return once the broker has confirmed
        every one: published back to back on a channel of their own in confirm mode, their
        confirms awaited together (one wait, and one disk sync of the broker, for all of them,
        where `publish` waits a round trip for each: a bundle's `ShardFinished` events).

        If the pipelined attempt fails (the connection lost, a message nacked, no confirms within
        CONFIRMS_TIMEOUT_S; its connection is then dropped, not closed) every message is published
        again by `publish` (its retries, then its connection error): messages confirmed before the
        failure reach the broker twice, which the consumers of events take (they are idempotent).
        Each message's `cairn_publish_confirm_seconds` runs from its publish to the last confirm;
        a failed attempt counts each message it had published in `cairn_publish_failures_total`.
        The closing of the channel after the last confirm waits for the broker's answer, as
        `publish` does: the one wait not bounded here."""
        if len(messages) < 2:
            for message in messages:
                self.publish(message)
            return
        try:
            self._publish_pipelined(messages)
        except (OSError, AMQPError, MessageNacked, OperationalError) as error:
            logger.warning("%d messages: pipelined publish failed (%r); publishing them one by one", len(messages), error)
            for message in messages:
                self.publish(message)

    def _publish_pipelined(self, messages: Sequence[Message]) -> None:
        published: list[tuple[str, float]] = []  # (exchange, when) of each message, in tag order
        with self._app.pool.acquire(block=True) as connection:  # Celery's broker connection pool
            try:
                # A pooled connection may come back closed (kombu closes it after a failed publish's
                # retries) or dropped (below): connect it again, one attempt (`publish`'s retries
                # are the fallback's).
                connection.ensure_connection(max_retries=0)
                channel = connection.channel()
                channel.confirm_select()
                confirms = _Confirms()
                channel.events["basic_ack"].add(confirms.ack)
                channel.events["basic_nack"].add(confirms.nack)
                for message in messages:
                    route = message.route()
                    with producer_span(route.exchange, route.routing_key, message):
                        prepared = channel.prepare_message(
                            message.model_dump_json().encode(), None, "application/json", "utf-8",
                            message_headers(message, None), {"delivery_mode": 2},
                        )
                        published.append((route.exchange, time.perf_counter()))
                        # The class's publish, not the channel's: with confirm_publish on, kombu
                        # makes each channel's `basic_publish` wait for its own confirm.
                        amqp.Channel.basic_publish(channel, prepared, exchange=route.exchange, routing_key=route.routing_key)
                deadline = time.monotonic() + CONFIRMS_TIMEOUT_S
                while confirms.up_to < len(messages):  # all settled, nacked or not: the channel closes clean
                    channel.wait([Basic.Ack, Basic.Nack], timeout=max(0.01, deadline - time.monotonic()))
                if confirms.nacked:
                    raise MessageNacked(f"the broker refused message(s) {sorted(confirms.nacked)}")
            except BaseException:
                for exchange, _ in published:
                    PUBLISH_FAILURES.labels(exchange).inc()
                # The channel's state is unknown (a confirm may still come, the broker may not
                # answer a close): drop the connection without waiting on it; the pool reconnects.
                connection.collect()
                raise
            confirmed = time.perf_counter()
            for exchange, started in published:
                PUBLISH_SECONDS.labels(exchange).observe(confirmed - started)
            try:
                channel.close()
            except (OSError, AMQPError):
                connection.collect()  # all confirmed already; the next batch reconnects


class _Confirms:
    """The publisher confirms of one channel: delivery tags count its publishes from 1 after
    `confirm.select`, and an ack or nack with `multiple` settles every tag up to its own
    (RabbitMQ's publisher confirms, https://www.rabbitmq.com/docs/confirms)."""

    def __init__(self) -> None:
        self.up_to = 0  # every tag up to this one is settled
        self.nacked: set[int] = set()
        self._above: set[int] = set()  # tags settled one by one past `up_to`

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.up_to = max(self.up_to, delivery_tag)
        else:
            self._above.add(delivery_tag)
        while self.up_to + 1 in self._above:
            self.up_to += 1
        self._above = {tag for tag in self._above if tag > self.up_to}

    def nack(self, delivery_tag: int, multiple: bool) -> None:
        unsettled = range(self.up_to + 1, delivery_tag + 1) if multiple else (delivery_tag,)
        self.nacked.update(tag for tag in unsettled if tag not in self._above)
        self.ack(delivery_tag, multiple)


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
