"""The worker's kombu side of the broker: same topology as the asyncio services, confirmed publishes."""

from collections.abc import Iterator

import pytest
from amqp.exceptions import MessageNacked
from celery import Celery
from kombu.exceptions import OperationalError

from cairn_contracts.messages import DeadLetter, ShardFinished
from cairn_contracts.topology import (
    EXCHANGE_COMMANDS,
    EXCHANGE_EVENTS,
    EXCHANGE_TASKS,
    HEADER_MESSAGE_TYPE,
    HEADER_SCHEMA_VERSION,
    HEADER_SOURCE_QUEUE,
    QUEUE_DLQ,
    QUEUE_INGEST,
    QUEUE_SCHEDULER_COMMANDS,
    QUEUE_SCHEDULER_EVENTS,
    ROUTING_INGEST,
    ROUTING_SHARD_FAILED,
    ROUTING_SHARD_SUCCEEDED,
    ROUTING_START_JOB,
)
from cairn_ingest_worker.publisher import BrokerPublisher, _Confirms, declare_topology
from cairn_runtime.celery_config import celery_config
from cairn_testkit.aio import next_message
from cairn_testkit.records import dead_letter


@pytest.fixture
def celery_app(test_env) -> Iterator[Celery]:
    app = Celery("cairn-worker-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    yield app
    app.close()


async def test_kombu_declares_the_same_topology_as_aio_pika(broker, celery_app) -> None:
    # `broker` declared everything with aio-pika; a redeclare with other arguments would be refused.
    with celery_app.connection_for_write() as connection:
        declare_topology(connection)
        declare_topology(connection)

    # and the bindings kombu declared route as the contracts say
    await broker.publisher.publish_bytes(EXCHANGE_COMMANDS, ROUTING_START_JOB, b"ping", headers={})
    assert (await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])).body == b"ping"


async def test_celery_declares_the_ingest_queue_compatibly(broker, celery_app) -> None:
    with celery_app.connection_for_write() as connection:
        queue = celery_app.amqp.queues[QUEUE_INGEST](connection.default_channel)
        assert queue.declare() == QUEUE_INGEST  # PRECONDITION_FAILED if the arguments differed

    await broker.publisher.publish_bytes(EXCHANGE_TASKS, ROUTING_INGEST, b"task", headers={})
    assert (await next_message(broker.queues[QUEUE_INGEST])).body == b"task"


async def test_broker_publisher_publishes_a_persistent_event_with_contract_headers(broker, celery_app) -> None:
    event = ShardFinished(job_id="job", shard_key="job:0001", outcome="failed", records_done=0, error="boom")

    BrokerPublisher(celery_app).publish(event)

    message = await next_message(broker.queues[QUEUE_SCHEDULER_EVENTS])
    assert ShardFinished.model_validate_json(message.body) == event
    assert message.delivery_mode == 2
    assert message.headers[HEADER_MESSAGE_TYPE] == ShardFinished.message_type
    assert message.headers[HEADER_SCHEMA_VERSION] == 1
    assert message.routing_key == ROUTING_SHARD_FAILED


async def test_broker_publisher_dead_letters_reach_the_dlq(broker, celery_app) -> None:
    letter = dead_letter("dl-worker-1", reason="poison", error_type="RuntimeError", error_message="started 5 times", attempts=6)

    BrokerPublisher(celery_app).publish(letter)

    message = await next_message(broker.queues[QUEUE_DLQ])
    assert DeadLetter.model_validate_json(message.body) == letter
    assert message.headers[HEADER_SOURCE_QUEUE] == QUEUE_INGEST
    assert message.routing_key == QUEUE_INGEST


async def test_publish_all_publishes_every_message_persistent_in_order_on_its_route(broker, celery_app) -> None:
    events = [
        ShardFinished(job_id="job", shard_key=f"job:{i:04d}", outcome="failed" if i == 2 else "succeeded", records_done=i, error="boom" if i == 2 else None)
        for i in range(5)
    ]

    BrokerPublisher(celery_app).publish_all(events)

    received = [await next_message(broker.queues[QUEUE_SCHEDULER_EVENTS]) for _ in events]
    assert [ShardFinished.model_validate_json(m.body) for m in received] == events
    assert [m.routing_key for m in received] == [ROUTING_SHARD_SUCCEEDED] * 2 + [ROUTING_SHARD_FAILED] + [ROUTING_SHARD_SUCCEEDED] * 2
    assert {m.delivery_mode for m in received} == {2}
    assert {m.headers[HEADER_MESSAGE_TYPE] for m in received} == {ShardFinished.message_type}


async def test_publish_all_raises_when_the_broker_refuses_the_messages(broker, celery_app) -> None:
    # A queue that rejects every publish routed to it makes RabbitMQ nack those messages: the
    # pipelined attempt sees the nacks, publishes them again one by one, and those are refused too,
    # so the caller gets `publish`'s error (kombu's, after its retries), not a quiet return.
    refusing = await broker.channel.declare_queue(
        "cairn-test-refusing", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}, auto_delete=False
    )
    try:
        await refusing.bind(EXCHANGE_EVENTS, ROUTING_SHARD_SUCCEEDED)
        events = [ShardFinished(job_id="job", shard_key=f"job:{i:04d}", outcome="succeeded", records_done=1) for i in range(3)]

        publisher = BrokerPublisher(celery_app)
        with pytest.raises(OperationalError) as raised:
            publisher.publish_all(events)
        assert isinstance(raised.value.__cause__, MessageNacked)
    finally:
        await refusing.delete(if_unused=False, if_empty=False)
    await broker.queues[QUEUE_SCHEDULER_EVENTS].purge()  # what the other bound queue took

    # The failed attempt dropped its pooled connection: the next batch reconnects and goes out.
    publisher.publish_all(events)
    received = [ShardFinished.model_validate_json((await next_message(broker.queues[QUEUE_SCHEDULER_EVENTS])).body) for _ in events]
    assert received == events


def test_confirms_settle_by_delivery_tag_single_multiple_and_out_of_order() -> None:
    confirms = _Confirms()
    confirms.ack(2, multiple=False)  # out of order: 1 is not settled yet
    assert confirms.up_to == 0
    confirms.ack(1, multiple=False)
    assert confirms.up_to == 2
    confirms.ack(2, multiple=False)  # a duplicate changes nothing
    confirms.ack(5, multiple=False)
    confirms.nack(4, multiple=True)  # settles 3 and 4, refuses both; 5 was acked on its own
    assert confirms.up_to == 5 and confirms.nacked == {3, 4}
    confirms.ack(7, multiple=True)
    assert confirms.up_to == 7 and confirms.nacked == {3, 4}
