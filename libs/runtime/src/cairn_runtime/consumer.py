"""The one way an asyncio service consumes: manual ack after the handler's work is durable.

- A body that does not validate against the expected contract is dead-lettered with the
  validation error as its reason, then acked: a poison body never blocks the queue.
- A handler that raises `Unprocessable` gets the message dead-lettered the same way.
- Any other exception is transient: the message is requeued after a pause (so a broken store
  does not spin the consumer), and handled again later.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from cairn_contracts.messages import DeadLetterReason, Message
from cairn_contracts.topology import HEADER_CORRELATION_ID
from cairn_runtime.amqp import ContractViolation, Publisher, dead_letter_for, decode, original_of, publish_dead_letter
from cairn_runtime.log import correlation_id

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

M = TypeVar("M", bound=Message)


class Unprocessable(Exception):
    """The message is well-formed but can never be handled (e.g. it names an unknown job)."""


class ContractConsumer(Generic[M]):
    def __init__(
        self,
        *,
        service: str,
        queue: AbstractQueue,
        model: type[M],
        handler: Callable[[M], Awaitable[None]],
        publisher: Publisher,
        requeue_delay_s: float = 1.0,
    ) -> None:
        self._service = service
        self._queue = queue
        self._model = model
        self._handler = handler
        self._publisher = publisher
        self._requeue_delay_s = requeue_delay_s

    async def start(self) -> str:
        return await self._queue.consume(self.on_message)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        token = otel_context.attach(propagate.extract({k: v for k, v in headers.items() if isinstance(v, str)}))
        correlation_token = correlation_id.set(_text(headers.get(HEADER_CORRELATION_ID)))
        try:
            with tracer.start_as_current_span(f"consume {self._queue.name}", kind=trace.SpanKind.CONSUMER):
                await self._process(message)
        finally:
            correlation_id.reset(correlation_token)
            otel_context.detach(token)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            payload = decode(message, self._model)
        except ContractViolation as error:
            await self._dead_letter(message, "contract_violation", error)
            return
        try:
            await self._handler(payload)
        except Unprocessable as error:
            await self._dead_letter(message, "non_retryable", error)
        except Exception:
            logger.exception("handling %s failed; requeued", self._model.message_type)
            await asyncio.sleep(self._requeue_delay_s)
            await message.nack(requeue=True)
        else:
            await message.ack()

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
            await publish_dead_letter(self._publisher, dead_letter)
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
