"""The one way an asyncio service consumes: manual ack after the handler's work is durable.

- A body that does not validate against the expected contract is dead-lettered with the
  validation error as its reason, then acked: a poison body never blocks the queue.
- A handler that raises `Unprocessable` gets the message dead-lettered the same way.
- Any other exception is transient: the message is requeued after a pause (so a broken store
  does not spin the consumer), and handled again later.

A service lists what it consumes as a table of `Subscription(queue, model, handler)` rows in its
main.py (started by `cairn_runtime.service.serve`). The model `aio_pika.IncomingMessage` means
"any message, undecoded": the handler gets the delivered message itself (the DLQ recorder, whose
queue carries Cairn dead letters and raw messages the broker dead-lettered alike).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from aio_pika import IncomingMessage
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from cairn_contracts.messages import DeadLetterReason, Message
from cairn_contracts.topology import HEADER_CORRELATION_ID, HEADER_MESSAGE_TYPE
from cairn_runtime.amqp import ContractViolation, Publisher, dead_letter_for, decode, original_of
from cairn_runtime.log import log_context
from cairn_runtime.tracing import describe_work, message_attributes

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# What a handler receives: a contract message, or (model `IncomingMessage`) the message itself.
M = TypeVar("M", bound=Message | IncomingMessage)


class Unprocessable(Exception):
    """The message is well-formed but can never be handled (e.g. it names an unknown job)."""


@dataclass(frozen=True)
class Subscription(Generic[M]):
    """One row of a service's handlers table: each message on `queue` (a queue name of
    `cairn_contracts.topology`) is decoded as `model` and given to `handler`."""

    queue: str
    model: type[M]
    handler: Callable[[M], Awaitable[object]]


class ContractConsumer(Generic[M]):
    def __init__(
        self,
        *,
        service: str,
        queue: AbstractQueue,
        model: type[M],
        handler: Callable[[M], Awaitable[object]],
        publisher: Publisher,
        requeue_delay_s: float = 1.0,
    ) -> None:
        self._service = service
        self._queue = queue
        self._model = model
        self._handler = handler
        self._publisher = publisher
        self._requeue_delay_s = requeue_delay_s
        self._what = model.message_type if issubclass(model, Message) else f"a {queue.name} message"

    async def start(self) -> str:
        return await self._queue.consume(self.on_message)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        with consuming(message, self._queue.name):
            await self._process(message)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            payload = self._decode(message)
        except ContractViolation as error:
            await self._dead_letter(message, "contract_violation", error)
            return
        describe_work(**message_attributes(payload))
        try:
            await self._handler(payload)
        except Unprocessable as error:
            await self._dead_letter(message, "non_retryable", error)
        except Exception:
            logger.exception("handling %s failed; requeued", self._what)
            await asyncio.sleep(self._requeue_delay_s)
            await message.nack(requeue=True)
        else:
            await message.ack()

    def _decode(self, message: AbstractIncomingMessage) -> M:
        """The handler's argument; raises ContractViolation for a body that is not a `model`."""
        if issubclass(self._model, Message):
            return cast(M, decode(message, self._model))
        return cast(M, message)  # any message: the handler reads it itself

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: DeadLetterReason, error: Exception) -> None:
        logger.error("dead-lettering a %s message: %s", self._queue.name, error)
        dead_letter = dead_letter_for(
            source_service=self._service,
            source_queue=self._queue.name,
            reason=reason,
            error=error,
            original=original_of(message),
        )
        try:
            await self._publisher.publish(dead_letter)
        except Exception:
            logger.exception("dead letter not confirmed; message requeued")
            await asyncio.sleep(self._requeue_delay_s)
            await message.nack(requeue=True)
            return
        await message.ack()


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


@contextmanager
def consuming(message: AbstractIncomingMessage, queue: str) -> Iterator[None]:
    """The context every consumed message is handled in: the publisher's trace context from the
    W3C headers, a CONSUMER span (its child), and the message's correlation id for the logs.
    The log context (job, shard) set while handling it is dropped afterwards."""
    headers = message.headers or {}
    token = otel_context.attach(propagate.extract({k: v for k, v in headers.items() if isinstance(v, str)}))
    attributes: dict[str, str | bool] = {
        "messaging.system": "rabbitmq",
        "messaging.operation": "process",
        "messaging.source.name": queue,
        "messaging.destination.name": message.exchange or "",
        "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
        "messaging.message.id": message.message_id or "",
        "messaging.message.type": _text(headers.get(HEADER_MESSAGE_TYPE)) or "",
        "messaging.message.redelivered": bool(message.redelivered),
    }
    try:
        with log_context(correlation_id=_text(headers.get(HEADER_CORRELATION_ID)), job_id=None, shard_key=None):
            with tracer.start_as_current_span(f"consume {queue}", kind=trace.SpanKind.CONSUMER, attributes=attributes):
                yield
    finally:
        otel_context.detach(token)
