"""`Batched`: messages delivered together are handled together, each call still succeeding or
failing on its own; pure asyncio (no broker), plus ContractConsumer over fake messages."""

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from cairn_contracts.messages import ShardFinished
from cairn_runtime.consumer import Batched, ContractConsumer, Unprocessable

WAIT_S = 5.0


class Recorder:
    """A `handle_many` that records its batches; `gate` (when set) holds each batch until opened."""

    def __init__(self, *, gated: bool = False, fail_with: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_with = fail_with
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> None:
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with


async def until(condition: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0)


async def test_a_lone_message_is_handled_at_once_in_a_batch_of_its_own() -> None:
    handle_many = Recorder()
    async with asyncio.timeout(WAIT_S):
        await Batched(handle_many)(1)
    assert handle_many.batches == [[1]]


async def test_messages_arriving_while_a_batch_is_handled_form_the_next_batch() -> None:
    handle_many = Recorder(gated=True)
    handler = Batched(handle_many)
    first = asyncio.create_task(handler(1))
    await asyncio.wait_for(handle_many.started.wait(), WAIT_S)
    rest = [asyncio.create_task(handler(i)) for i in range(2, 7)]
    await asyncio.sleep(0.01)
    assert handle_many.batches == [[1]] and not first.done()  # each call waits for its own batch
    assert handle_many.gate is not None
    handle_many.gate.set()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(first, *rest)
    assert handle_many.batches == [[1], [2, 3, 4, 5, 6]]


async def test_calls_made_together_share_one_batch_and_max_batch_caps_it() -> None:
    handle_many = Recorder()
    async with asyncio.timeout(WAIT_S):
        handler = Batched(handle_many, max_batch=2)
        await asyncio.gather(*(handler(i) for i in range(5)))
    assert handle_many.batches == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        Batched(handle_many, max_batch=0)


async def test_a_failing_batch_fails_each_of_its_calls_and_the_next_batch_still_runs() -> None:
    error = Unprocessable("no such job")
    handle_many = Recorder(gated=True, fail_with=error)
    handler = Batched(handle_many)
    calls = [asyncio.create_task(handler(i)) for i in range(3)]
    await asyncio.wait_for(handle_many.started.wait(), WAIT_S)
    assert handle_many.gate is not None
    handle_many.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT_S)
    assert results == [error] * 3  # the same exception, its type kept (Unprocessable dead-letters)

    handle_many.fail_with = None
    async with asyncio.timeout(WAIT_S):
        await handler(9)
    assert handle_many.batches == [[0, 1, 2], [9]]


async def test_a_cancelled_caller_is_left_out_of_its_batch_or_leaves_the_others_unaffected() -> None:
    handle_many = Recorder(gated=True)
    handler = Batched(handle_many)
    running = [asyncio.create_task(handler(i)) for i in (1, 2)]
    await asyncio.wait_for(handle_many.started.wait(), WAIT_S)
    waiting = [asyncio.create_task(handler(i)) for i in (3, 4)]
    await asyncio.sleep(0.01)
    running[0].cancel()  # its batch is being handled
    waiting[0].cancel()  # its batch is not taken yet
    assert handle_many.gate is not None
    handle_many.gate.set()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(running[1], waiting[1])
    assert running[0].cancelled() and waiting[0].cancelled()
    assert handle_many.batches == [[1, 2], [4]]


async def test_a_cancelled_drain_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    handle_many = Recorder(gated=True)
    handler = Batched(handle_many)
    running = asyncio.create_task(handler(1))
    await asyncio.wait_for(handle_many.started.wait(), WAIT_S)
    waiting = asyncio.create_task(handler(2))
    await asyncio.sleep(0.01)
    drain = next(task for task in asyncio.all_tasks() if task.get_name() == "batched-drain")
    drain.cancel()
    results = await asyncio.wait_for(asyncio.gather(running, waiting, return_exceptions=True), WAIT_S)
    assert [type(result) for result in results] == [RuntimeError, RuntimeError]  # requeued, not lost

    assert handle_many.gate is not None
    handle_many.gate.set()
    async with asyncio.timeout(WAIT_S):
        await handler(3)  # a new drain serves the next calls
    assert handle_many.batches == [[1], [3]]


# ContractConsumer with a batched handler: each message is acked, requeued or dead-lettered as if
# its handler had succeeded or raised on its own.


@dataclass
class FakeMessage:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    exchange: str = "cairn.events"
    routing_key: str = "shard.finished"
    message_id: str = "m"
    redelivered: bool = False
    outcome: str | None = None

    async def ack(self) -> None:
        self.outcome = "ack"

    async def nack(self, requeue: bool = True) -> None:
        self.outcome = "requeue" if requeue else "drop"


@dataclass
class FakeQueue:
    name: str = "cairn.scheduler.events"


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[Any] = []

    async def publish(self, message: Any) -> None:
        self.published.append(message)


def finished(key: str) -> FakeMessage:
    event = ShardFinished(job_id="j", shard_key=key, outcome="succeeded", records_done=1)
    return FakeMessage(body=event.model_dump_json().encode())


async def consume_together(handle_many: Any, messages: list[FakeMessage]) -> FakePublisher:
    publisher = FakePublisher()
    consumer = ContractConsumer(
        service="tests", queue=FakeQueue(), model=ShardFinished, handler=Batched(handle_many),  # type: ignore[arg-type]
        publisher=publisher, requeue_delay_s=0.0,  # type: ignore[arg-type]
    )
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*(consumer.on_message(m) for m in messages))  # type: ignore[arg-type]
    return publisher


async def test_a_consumer_acks_every_message_of_a_handled_batch() -> None:
    keys: list[list[str]] = []

    async def handle_many(events: list[ShardFinished]) -> None:
        keys.append([e.shard_key for e in events])

    messages = [finished(f"j:{i:04d}") for i in range(4)]
    await consume_together(handle_many, messages)
    assert [m.outcome for m in messages] == ["ack"] * 4
    assert sorted(k for batch in keys for k in batch) == [f"j:{i:04d}" for i in range(4)]
    assert len(keys) < 4  # delivered together, handled together


async def test_a_consumer_requeues_or_dead_letters_every_message_of_a_failed_batch() -> None:
    async def broken(events: list[ShardFinished]) -> None:
        raise ConnectionError("store unreachable")

    messages = [finished(f"j:{i:04d}") for i in range(3)]
    publisher = await consume_together(broken, messages)
    assert [m.outcome for m in messages] == ["requeue"] * 3 and publisher.published == []

    async def refused(events: list[ShardFinished]) -> None:
        raise Unprocessable("never")

    messages = [finished(f"j:{i:04d}") for i in range(3)]
    publisher = await consume_together(refused, messages)
    assert [m.outcome for m in messages] == ["ack"] * 3 and len(publisher.published) == 3
