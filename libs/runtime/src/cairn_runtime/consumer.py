"""The one way an asyncio service consumes: manual ack after the handler's work is durable.

- A body that does not validate against the expected contract is dead-lettered with the
  validation error as its reason, then acked: a poison body never blocks the queue.
- A handler that raises `Unprocessable` gets the message dead-lettered the same way.
- Any other exception is transient: the message is requeued after a pause (so a broken store
  does not spin the consumer), and handled again later.

A service lists what it consumes as a table of `Subscription(queue, model, handler)` rows in its
main.py (started by `cairn_runtime.service.serve`). The model `aio_pika.IncomingMessage` means
"any message, undecoded": the handler gets the delivered message itself (the DLQ recorder, whose
queue carries Cairn dead letters and raw messages the broker dead-lettered alike). A handler of
many messages at once is given as `Batched(handle_many)`: the messages delivered together
(up to the channel's prefetch) are handled together, each still acked or requeued on its own.
"""

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
T = TypeVar("T")  # what a batched handler handles


class Unprocessable(Exception):
    """The message is well-formed but can never be handled (e.g. it names an unknown job)."""


@dataclass(frozen=True)
class Subscription(Generic[M]):
    """One row of a service's handlers table: each message on `queue` (a queue name of
    `cairn_contracts.topology`) is decoded as `model` and given to `handler`."""

    queue: str
    model: type[M]
    handler: Callable[[M], Awaitable[object]]


class Batched(Generic[T]):
    """A handler of many messages (`handle_many(items)`) as the one-message handler a
    `Subscription` takes, so that messages delivered together share their work.

    Each call queues its message and waits for the batch it lands in. One drain task (started by
    a call when none runs) hands `handle_many` every message waiting, at most `max_batch`, then
    those that arrived meanwhile, until none waits. Opportunistic, no timer: a lone message is
    handled at once; under load, the messages delivered while a batch is handled form the next
    (with prefetch N, a batch has at most N). Batches run one at a time.

    `handle_many` returns: each call of the batch returns (its message is acked). It raises: each
    call raises that same exception, so every message of the batch is requeued as a failing
    handler's is, or dead-lettered for `Unprocessable` (raise that only when no message of the
    batch can ever be handled). As any handler, it must be idempotent per message. A caller
    cancelled before its batch is taken is left out of it; cancelled later, it changes nothing
    for the others. Should the drain task end with messages waiting (cancelled), their calls
    raise RuntimeError (requeued): no call is left waiting.

    The drain runs in a fresh context (not the log context of the message that started it); each
    batch is a span linked to the consume span of every message in it."""

    def __init__(self, handle_many: Callable[[list[T]], Awaitable[object]], max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._handle_many = handle_many
        self._max_batch = max_batch
        self._waiting: deque[tuple[T, trace.SpanContext, asyncio.Future[None]]] = deque()
        self._drain: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> None:
        handled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, trace.get_current_span().get_span_context(), handled))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._drain_waiting(), name="batched-drain", context=contextvars.Context())
            self._drain.add_done_callback(self._drained)
        await handled  # cancelling this cancels `handled`: the drain then skips it

    async def _drain_waiting(self) -> None:
        while batch := self._take():
            await self._handle(batch)

    def _take(self) -> list[tuple[T, trace.SpanContext, asyncio.Future[None]]]:
        batch: list[tuple[T, trace.SpanContext, asyncio.Future[None]]] = []
        while self._waiting and len(batch) < self._max_batch:
            waiting = self._waiting.popleft()
            if not waiting[2].done():  # its caller was cancelled
                batch.append(waiting)
        return batch

    async def _handle(self, batch: list[tuple[T, trace.SpanContext, asyncio.Future[None]]]) -> None:
        links = [trace.Link(context) for _, context, _ in batch if context.is_valid]
        try:
            with tracer.start_as_current_span("handle batch", links=links, attributes={"cairn.batch.size": len(batch)}):
                await self._handle_many([item for item, _, _ in batch])
        except Exception as error:
            _settle(batch, error)
        except BaseException as error:  # the drain itself cancelled: its callers must not wait forever
            _settle(batch, RuntimeError(f"batch handling interrupted: {error!r}"))
            raise
        else:
            _settle(batch, None)

    def _drained(self, task: "asyncio.Task[None]") -> None:
        if self._drain is not task:
            return  # a newer drain owns what waits now
        self._drain = None
        if self._waiting:  # only if it was cancelled (a finished drain leaves nothing waiting)
            if not task.cancelled() and task.exception() is not None:
                logger.error("batch drain failed", exc_info=task.exception())
            _settle(self._waiting, RuntimeError("the batch drain ended before handling this message"))
            self._waiting.clear()


def _settle(batch: Iterable[tuple[object, trace.SpanContext, asyncio.Future[None]]], error: BaseException | None) -> None:
    for _, _, handled in batch:
        if handled.done():
            continue  # its caller was cancelled
        if error is None:
            handled.set_result(None)
        else:
            handled.set_exception(error)


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
