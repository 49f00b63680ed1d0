"""ContractConsumer and `serve` against the real broker: ack, dead-letter, requeue, raw messages."""

import asyncio

from aio_pika import IncomingMessage
from aio_pika.abc import AbstractIncomingMessage

from cairn_contracts.messages import DeadLetter, StartJob
from cairn_contracts.topology import EXCHANGE_COMMANDS, QUEUE_DLQ, QUEUE_SCHEDULER_COMMANDS, ROUTING_START_JOB
from cairn_runtime.consumer import ContractConsumer, Subscription, Unprocessable
from cairn_runtime.log import correlation_id
from cairn_runtime.service import Every, serve
from cairn_testkit.aio import next_message

WAIT_S = 10.0


def command(job_id: str) -> StartJob:
    return StartJob.model_validate(
        {
            "job_id": job_id,
            "tenant": "default",
            "spec": {"pipeline": "synthetic", "params": {"count": 3}},
            "submitted_at": "2026-01-01T00:00:00Z",
        }
    )


class Harness:
    """Runs a ContractConsumer on its own channel; counts the messages it has finished with."""

    def __init__(self, broker, handler, *, requeue_delay_s: float = 0.01) -> None:
        self.broker = broker
        self.handler = handler
        self.requeue_delay_s = requeue_delay_s
        self.finished = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> "Harness":
        self.channel = await self.broker.connection.channel()
        queue = await self.channel.get_queue(QUEUE_SCHEDULER_COMMANDS)
        self.consumer = ContractConsumer(
            service="tests",
            queue=queue,
            model=StartJob,
            handler=self.handler,
            publisher=self.broker.publisher,
            requeue_delay_s=self.requeue_delay_s,
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self.consumer.on_message(message)  # returns once the message is acked or nacked
            async with self._changed:
                self.finished += 1
                self._changed.notify_all()

        await queue.consume(on_message)
        return self

    async def wait_finished(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: self.finished >= count)

    async def __aexit__(self, *exc_info: object) -> None:
        # Closing the channel returns every unacked message to the queue.
        await self.channel.close()


async def assert_queue_empty(broker, name: str) -> None:
    channel = await broker.connection.channel()
    try:
        assert await (await channel.get_queue(name)).get(fail=False) is None, f"{name} is not empty"
    finally:
        await channel.close()


async def test_valid_message_reaches_the_handler_and_is_acked(broker) -> None:
    handled: list[StartJob] = []

    async def handler(message: StartJob) -> None:
        handled.append(message)

    async with Harness(broker, handler) as harness:
        await broker.publisher.publish(command("job-ok"))
        await harness.wait_finished(1)

    assert handled == [command("job-ok")]
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)
    await assert_queue_empty(broker, QUEUE_DLQ)


async def test_start_consumes_the_queue(broker) -> None:
    handled = asyncio.Event()

    async def handler(message: StartJob) -> None:
        if message.job_id == "job-start":
            handled.set()

    channel = await broker.connection.channel()
    try:
        consumer = ContractConsumer(
            service="tests",
            queue=await channel.get_queue(QUEUE_SCHEDULER_COMMANDS),
            model=StartJob,
            handler=handler,
            publisher=broker.publisher,
        )
        assert await consumer.start()
        await broker.publisher.publish(command("job-start"))
        async with asyncio.timeout(WAIT_S):
            await handled.wait()
    finally:
        await channel.close()


async def test_invalid_body_is_dead_lettered_as_contract_violation(broker) -> None:
    calls = []

    async def handler(message: StartJob) -> None:
        calls.append(message)

    body = b'{"job_id": "job-bad", "schema_version": 1}'
    async with Harness(broker, handler) as harness:
        await broker.publisher.publish_bytes(
            EXCHANGE_COMMANDS, ROUTING_START_JOB, body, headers={"x-correlation-id": "corr-bad"}
        )
        await harness.wait_finished(1)

    assert calls == []
    letter = DeadLetter.model_validate_json((await next_message(broker.queues[QUEUE_DLQ])).body)
    assert letter.reason == "contract_violation"
    assert letter.source_service == "tests"
    assert letter.source_queue == QUEUE_SCHEDULER_COMMANDS
    assert letter.error_type == "ContractViolation"
    assert "tenant" in letter.error_message  # the validation error names the missing field
    assert letter.original.body == body.decode()
    assert letter.original.headers["x-correlation-id"] == "corr-bad"
    assert letter.original.routing_key == ROUTING_START_JOB
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)


async def test_non_json_body_is_dead_lettered_as_contract_violation(broker) -> None:
    async def handler(message: StartJob) -> None:
        raise AssertionError("must not be called")

    async with Harness(broker, handler) as harness:
        await broker.publisher.publish_bytes(EXCHANGE_COMMANDS, ROUTING_START_JOB, b"<xml/>", headers={})
        await harness.wait_finished(1)

    letter = DeadLetter.model_validate_json((await next_message(broker.queues[QUEUE_DLQ])).body)
    assert letter.reason == "contract_violation"
    assert letter.original.body == "<xml/>"
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)


async def test_unprocessable_is_dead_lettered_as_non_retryable(broker) -> None:
    async def handler(message: StartJob) -> None:
        raise Unprocessable(f"job {message.job_id} is not recorded")

    async with Harness(broker, handler) as harness:
        await broker.publisher.publish(command("job-gone"))
        await harness.wait_finished(1)

    letter = DeadLetter.model_validate_json((await next_message(broker.queues[QUEUE_DLQ])).body)
    assert letter.reason == "non_retryable"
    assert letter.error_type == "Unprocessable"
    assert letter.error_message == "job job-gone is not recorded"
    assert StartJob.model_validate_json(letter.original.body) == command("job-gone")
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)


async def test_other_exception_requeues_and_the_message_is_handled_again(broker) -> None:
    calls: list[tuple[str, int]] = []

    async def handler(message: StartJob) -> None:
        calls.append((message.job_id, len(calls) + 1))
        if len(calls) == 1:
            raise ConnectionError("the store blinked")

    async with Harness(broker, handler) as harness:
        await broker.publisher.publish(command("job-again"))
        await harness.wait_finished(2)

    assert calls == [("job-again", 1), ("job-again", 2)]
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)
    await assert_queue_empty(broker, QUEUE_DLQ)


async def test_correlation_id_is_visible_to_the_handler(broker) -> None:
    seen: list[str | None] = []

    async def handler(message: StartJob) -> None:
        seen.append(correlation_id.get())

    async with Harness(broker, handler) as harness:
        await broker.publisher.publish(command("job-corr"), correlation_id="corr-42")
        await harness.wait_finished(1)

    assert seen == ["corr-42"]


async def test_an_incoming_message_model_hands_any_body_over_undecoded(broker) -> None:
    """The DLQ recorder's variant: no contract to decode, so nothing is dead-lettered for its shape."""
    seen: list[tuple[bytes, str | None]] = []
    done = asyncio.Event()

    async def handler(message: IncomingMessage) -> None:
        seen.append((message.body, message.routing_key))
        done.set()

    channel = await broker.connection.channel()
    try:
        consumer = ContractConsumer(
            service="tests",
            queue=await channel.get_queue(QUEUE_SCHEDULER_COMMANDS),
            model=IncomingMessage,
            handler=handler,
            publisher=broker.publisher,
        )
        await consumer.start()
        await broker.publisher.publish_bytes(EXCHANGE_COMMANDS, ROUTING_START_JOB, b"<not a contract/>", headers={})
        async with asyncio.timeout(WAIT_S):
            await done.wait()
    finally:
        await channel.close()

    assert seen == [(b"<not a contract/>", ROUTING_START_JOB)]
    await assert_queue_empty(broker, QUEUE_SCHEDULER_COMMANDS)
    await assert_queue_empty(broker, QUEUE_DLQ)


async def test_serve_consumes_the_table_runs_the_loops_and_stops_them(broker) -> None:
    handled = asyncio.Event()
    passes: list[int] = []

    async def handler(message: StartJob) -> None:
        handled.set()

    async def tick() -> None:
        passes.append(len(passes))

    stop = asyncio.Event()
    channel = await broker.connection.channel()
    queues = {QUEUE_SCHEDULER_COMMANDS: await channel.get_queue(QUEUE_SCHEDULER_COMMANDS)}
    served = asyncio.create_task(
        serve(
            stop,
            [Subscription(QUEUE_SCHEDULER_COMMANDS, StartJob, handler)],
            [Every(0.01, tick, "test tick")],
            service="tests",
            queues=queues,
            publisher=broker.publisher,
        )
    )
    try:
        await broker.publisher.publish(command("job-served"))
        async with asyncio.timeout(WAIT_S):
            await handled.wait()
            while len(passes) < 3:
                await asyncio.sleep(0.01)
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await served
        after_stop = len(passes)
        await asyncio.sleep(0.05)
        assert len(passes) == after_stop  # the loop was cancelled with the stop
    finally:
        stop.set()
        await channel.close()
