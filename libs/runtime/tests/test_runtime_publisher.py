"""The confirmed publisher and the topology, against the real broker in this run's vhost."""

import asyncio
import contextvars

import aio_pika
import pytest
from opentelemetry.sdk.trace import TracerProvider

from cairn_contracts.messages import DeadLetter, RunShard, ShardFinished, StartJob
from cairn_contracts.topology import (
    EXCHANGE_COMMANDS,
    EXCHANGE_DLX,
    HEADER_CORRELATION_ID,
    HEADER_MESSAGE_TYPE,
    HEADER_SCHEMA_VERSION,
    HEADER_SOURCE_QUEUE,
    QUEUE_DLQ,
    QUEUE_SCHEDULER_COMMANDS,
    QUEUE_SCHEDULER_EVENTS,
    QUEUES,
    ROUTING_START_JOB,
)
from cairn_runtime.amqp import (
    Publisher,
    PublishNotConfirmed,
    dead_letter_for,
    declare_topology,
    original_of,
)
from cairn_testkit.aio import next_message

COMMAND = StartJob.model_validate(
    {"job_id": "job-pub", "tenant": "default", "spec": {"pipeline": "synthetic", "params": {"count": 10}}}
)


async def test_published_message_arrives_persistent_with_contract_headers(broker) -> None:
    await broker.publisher.publish(COMMAND, priority=3, correlation_id="corr-1")

    message = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers[HEADER_MESSAGE_TYPE] == StartJob.message_type
    assert message.headers[HEADER_SCHEMA_VERSION] == 1
    assert message.headers[HEADER_CORRELATION_ID] == "corr-1"
    assert message.correlation_id == "corr-1"
    assert message.priority == 3
    assert message.content_type == "application/json"
    assert message.message_id
    assert StartJob.model_validate_json(message.body) == COMMAND


async def test_traceparent_travels_when_a_span_is_active(broker) -> None:
    tracer = TracerProvider().get_tracer("cairn-tests")

    with tracer.start_as_current_span("publish") as span:
        await broker.publisher.publish(COMMAND)
        trace_id = format(span.get_span_context().trace_id, "032x")

    message = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    traceparent = message.headers["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == trace_id


async def test_no_traceparent_without_an_active_span(broker) -> None:
    # A fresh context: no span, no correlation id, whatever earlier code left in the test's context.
    publish = broker.publisher.publish(COMMAND)
    await asyncio.create_task(publish, context=contextvars.Context())

    message = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    assert "traceparent" not in message.headers
    assert HEADER_CORRELATION_ID not in message.headers


async def test_topic_routing_delivers_shard_events_to_the_scheduler(broker) -> None:
    event = ShardFinished(job_id="j", shard_key="j:0000", outcome="succeeded", records_done=5)

    await broker.publisher.publish(event)

    message = await next_message(broker.queues[QUEUE_SCHEDULER_EVENTS])
    assert ShardFinished.model_validate_json(message.body) == event


async def test_unroutable_publish_raises_publish_not_confirmed(broker) -> None:
    with pytest.raises(PublishNotConfirmed, match="no.such.route"):
        # no message type routes there: only a raw publish can name an unbound routing key
        await broker.publisher.publish_bytes(EXCHANGE_COMMANDS, "no.such.route", COMMAND.model_dump_json().encode(), headers={})

    # nothing reached the bound queue, and the publisher's channel is still usable
    assert await broker.queues[QUEUE_SCHEDULER_COMMANDS].get(fail=False) is None
    await broker.publisher.publish(COMMAND)
    assert StartJob.model_validate_json((await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])).body) == COMMAND


async def test_dead_letter_reaches_the_dlq_with_its_source_queue(broker) -> None:
    incoming_body = RunShard(job_id="j", shard_key="j:0003").model_dump_json()
    await broker.publisher.publish_bytes(
        EXCHANGE_COMMANDS, ROUTING_START_JOB, incoming_body.encode(), headers={"x-test": "yes"}
    )
    incoming = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    letter = dead_letter_for(
        source_service="tests",
        source_queue=QUEUE_SCHEDULER_COMMANDS,
        reason="non_retryable",
        error=ValueError("nope"),
        original=original_of(incoming),
        job_id="j",
        attempts=2,
    )

    await broker.publisher.publish(letter)

    message = await next_message(broker.queues[QUEUE_DLQ])
    assert message.routing_key == QUEUE_SCHEDULER_COMMANDS
    assert message.headers[HEADER_SOURCE_QUEUE] == QUEUE_SCHEDULER_COMMANDS
    received = DeadLetter.model_validate_json(message.body)
    assert received == letter
    assert received.original.body == incoming_body
    assert received.original.headers["x-test"] == "yes"
    assert received.original.routing_key == ROUTING_START_JOB
    assert received.error_type == "ValueError" and "nope" in received.stack


async def test_original_of_keeps_a_binary_body_as_base64(broker) -> None:
    await broker.publisher.publish_bytes(EXCHANGE_DLX, "anything", b"\xff\xfe\x00", headers={})

    original = original_of(await next_message(broker.queues[QUEUE_DLQ]))
    assert original.body_encoding == "base64"
    assert original.body == "//4A"


async def test_declare_topology_is_idempotent_and_binds_every_queue(broker) -> None:
    channel = await broker.connection.channel()
    queues = await declare_topology(channel)

    assert set(queues) == {q.name for q in QUEUES}
    # a message published to each binding lands on its queue (and maybe on others bound alike)
    for spec in QUEUES:
        for exchange, routing_key in spec.bindings:
            key = routing_key.replace("#", "any.thing").replace("*", "x")
            body = f"{spec.name} via {exchange}/{routing_key}".encode()
            await broker.publisher.publish_bytes(exchange, key, body, headers={})
            message = await next_message(queues[spec.name])
            assert message.body == body
            for queue in queues.values():
                await queue.purge()
    await channel.close()


async def test_publish_after_the_channel_closed_raises_publish_not_confirmed(broker) -> None:
    publisher = await Publisher.open(broker.connection, timeout_s=5.0)
    await publisher.close()

    with pytest.raises(PublishNotConfirmed):
        await publisher.publish(COMMAND)
