"""RabbitMQ for the asyncio services: the topology, the one confirmed publisher, decoding.

`Publisher.publish(message)` is the one way a service publishes a contract message: the route
(exchange, routing key) comes from `message.route()`, never from the call site.

Every publish is persistent (delivery mode 2), mandatory (an unroutable message is an error, not
a silent drop) and waits for the broker's publisher confirm. A publish that is not confirmed in
time raises `PublishNotConfirmed`; the caller decides whether to retry, requeue or report it.
"""

import asyncio
import base64
import contextlib
import logging
import traceback
import uuid
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from opentelemetry import propagate
from pydantic import ValidationError

from cairn_contracts.messages import DeadLetter, DeadLetterReason, Message, OriginalMessage
from cairn_contracts.topology import (
    EXCHANGES,
    HEADER_CORRELATION_ID,
    HEADER_MESSAGE_TYPE,
    HEADER_SCHEMA_VERSION,
    HEADER_SOURCE_QUEUE,
    QUEUES,
)
from cairn_runtime.header_depth import bound_header_depth
from cairn_runtime.log import correlation_id as correlation_id_var
from cairn_runtime.metrics import timed_publish
from cairn_runtime.tracing import producer_span

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

STACK_LIMIT = 4000  # characters of a stack summary kept in a dead letter


class PublishNotConfirmed(Exception):
    """The broker did not confirm a publish: nacked, returned as unroutable, or timed out."""


class ContractViolation(Exception):
    """A message body does not validate against the contract its consumer expects."""

    def __init__(self, message_type: str, error: ValidationError | ValueError) -> None:
        super().__init__(f"body is not a valid {message_type}: {error}")
        self.error = error


async def connect(url: str, connection_name: str, timeout_s: float | None = None) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself once made); the first attempt raises if the
    broker does not answer (within `timeout_s`, if given). Header tables are decoded to a bounded
    depth (header_depth.py)."""
    bound_header_depth()
    return await aio_pika.connect_robust(url, client_properties={"connection_name": connection_name}, timeout=timeout_s)


async def declare_topology(channel: AbstractChannel) -> dict[str, AbstractQueue]:
    """Declare every exchange, queue and binding; idempotent, so every service does it."""
    for spec in EXCHANGES:
        await channel.declare_exchange(spec.name, spec.type, durable=True)
    queues: dict[str, AbstractQueue] = {}
    for queue_spec in QUEUES:
        queue = await channel.declare_queue(queue_spec.name, durable=True, arguments=queue_spec.arguments)
        for exchange, routing_key in queue_spec.bindings:
            await queue.bind(exchange, routing_key)
        queues[queue_spec.name] = queue
    return queues


def message_headers(message: Message, correlation_id: str | None) -> dict[str, Any]:
    """The AMQP headers of a contract message (both publishers, asyncio and the worker's kombu):
    type, schema version, correlation id (the argument, else the current context's), the source
    queue of a dead letter, and the W3C trace context of the current span."""
    headers: dict[str, Any] = {
        HEADER_MESSAGE_TYPE: message.message_type,
        HEADER_SCHEMA_VERSION: message.schema_version,
    }
    correlation = correlation_id or correlation_id_var.get()
    if correlation:
        headers[HEADER_CORRELATION_ID] = correlation
    if isinstance(message, DeadLetter):
        headers[HEADER_SOURCE_QUEUE] = message.source_queue
    propagate.inject(headers)  # W3C traceparent / tracestate of the current span
    return headers


class Publisher:
    """Publishes contract messages with persistence, mandatory routing and publisher confirms."""

    def __init__(self, channel: AbstractChannel, timeout_s: float) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, timeout_s: float) -> "Publisher":
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, timeout_s)

    async def publish(self, message: Message, *, priority: int | None = None, correlation_id: str | None = None) -> None:
        """Publish `message` on its own route (`message.route()`); returns once the broker
        confirmed it. `priority`: 0..MAX_PRIORITY on priority queues. Raises `PublishNotConfirmed`."""
        route = message.route()
        with producer_span(route.exchange, route.routing_key, message):
            headers = message_headers(message, correlation_id)
            await self.publish_bytes(
                route.exchange,
                route.routing_key,
                message.model_dump_json().encode(),
                headers=headers,
                priority=priority,
                message_id=str(uuid.uuid4()),
                correlation_id=headers.get(HEADER_CORRELATION_ID),
            )

    async def publish_bytes(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any],
        priority: int | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Publish raw bytes on an explicit route: the transport under `publish`, and the way a
        test injects a body that is not a valid contract message. Raises `PublishNotConfirmed`."""
        amqp_message = aio_pika.Message(
            body,
            headers=headers,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=priority,
            message_id=message_id,
            correlation_id=correlation_id,
        )
        try:
            with timed_publish(exchange):
                target = await self._channel.get_exchange(exchange, ensure=False)
                await target.publish(amqp_message, routing_key, mandatory=True, timeout=self._timeout_s)
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise PublishNotConfirmed(f"{exchange}/{routing_key}: {exc!r}") from exc

    async def close(self) -> None:
        await self._channel.close()


class BackgroundPublisher(Publisher):
    """A Publisher for a service that must start, and keep answering, while RabbitMQ is away
    (the gateway: what it publishes is recorded first, and the scheduler's relay publishes it later).

    `start()` tries the broker once; if it does not answer, a background task keeps trying (backoff
    doubling up to `retry_max_s`, one log line per attempt) and declares the topology once it does.
    After that the robust connection reconnects by itself. Until connected, and whenever the
    connection is down, `publish` raises `PublishNotConfirmed` at once instead of waiting for a
    reconnect; a connected publish is bounded by `timeout_s` as a whole.
    """

    def __init__(self, url: str, connection_name: str, timeout_s: float, *, retry_max_s: float = 30.0) -> None:
        super().__init__(None, timeout_s)  # type: ignore[arg-type]  # no channel until connected
        self._url = url
        self._connection_name = connection_name
        self._retry_max_s = retry_max_s
        self._connection: AbstractRobustConnection | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect now if the broker answers, else keep trying in the background; never raises."""
        if await self._attempt():
            return
        self._connecting = asyncio.create_task(self._keep_trying(), name=f"{self._connection_name}: connect to RabbitMQ")

    @property
    def connected(self) -> bool:
        """True while a publish can be confirmed: connected, channel open."""
        return (
            self._connection is not None
            and self._connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def _keep_trying(self) -> None:
        delay = 0.5
        while not await self._attempt():
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _attempt(self) -> bool:
        connection = None
        try:
            connection = await connect(self._url, self._connection_name, timeout_s=self._timeout_s)
            async with connection.channel() as channel:
                await declare_topology(channel)
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except Exception as exc:  # whatever stops this attempt, the next one may succeed: never end the loop
            logger.warning("RabbitMQ does not answer (%r); publishes fail until it does, retrying", exc)
            if connection is not None:
                await connection.close()
            return False
        self._connection = connection
        logger.info("connected to RabbitMQ as %s", self._connection_name)
        return True

    async def publish_bytes(self, exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
        if not self.connected:
            raise PublishNotConfirmed(f"{exchange}/{routing_key}: not connected to RabbitMQ")
        try:
            # A robust channel would wait for a reconnect unbounded: bound the whole publish.
            async with asyncio.timeout(self._timeout_s):
                await super().publish_bytes(exchange, routing_key, body, **options)
        except TimeoutError as exc:
            raise PublishNotConfirmed(f"{exchange}/{routing_key}: not confirmed in {self._timeout_s} s") from exc

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channel = None  # type: ignore[assignment]


def decode(message: AbstractIncomingMessage, model: type[M]) -> M:
    try:
        return model.model_validate_json(message.body)
    except ValidationError as exc:
        raise ContractViolation(model.message_type, exc) from exc


def original_of(message: AbstractIncomingMessage) -> OriginalMessage:
    return original_message(message.body, message.headers, message.routing_key)


def original_message(body: bytes, headers: dict[str, Any] | None, routing_key: str | None) -> OriginalMessage:
    """A received message as it is kept in a dead letter (from aio-pika or kombu alike)."""
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    plain_headers = {str(key): _plain(value) for key, value in (headers or {}).items()}
    return OriginalMessage(body=text, body_encoding=encoding, headers=plain_headers, routing_key=routing_key)


def _plain(value: Any) -> Any:
    """AMQP header values as JSON-friendly Python values (x-death holds nested tables)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def dead_letter_for(
    *,
    source_service: str,
    source_queue: str,
    reason: DeadLetterReason,
    error: BaseException,
    original: OriginalMessage,
    job_id: str | None = None,
    shard_key: str | None = None,
    attempts: int = 0,
    dead_letter_id: str | None = None,
) -> DeadLetter:
    """`dead_letter_id`: derive it from the message when it may be dead-lettered again on a
    redelivery (the DLQ handler records one task_errors entry per id); default a fresh uuid4."""
    stack = "".join(traceback.format_exception(error))[-STACK_LIMIT:]
    return DeadLetter(
        dead_letter_id=dead_letter_id or str(uuid.uuid4()),
        source_service=source_service,
        source_queue=source_queue,
        reason=reason,
        error_type=type(error).__name__,
        error_message=str(error)[:2000],
        stack=stack,
        job_id=job_id,
        shard_key=shard_key,
        attempts=attempts,
        original=original,
    )
