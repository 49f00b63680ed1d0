"""ErrorRecorder with real dead-lettered messages from the broker and the MongoDB-wire server."""

import asyncio
import json

import kombu
import pytest

from cairn_contracts.messages import DeadLetter
from cairn_contracts.store import TASK_ERRORS
from cairn_contracts.topology import EXCHANGE_DLX, EXCHANGE_TASKS, HEADER_MESSAGE_TYPE, QUEUE_DLQ, QUEUE_INGEST, ROUTING_INGEST
from cairn_dlq_handler.main import run
from cairn_dlq_handler.recorder import ErrorRecorder, error_document
from cairn_dlq_handler.settings import DlqSettings
from cairn_runtime.mongo import ensure_indexes
from cairn_testkit.aio import next_message
from cairn_testkit.records import dead_letter


def letter(dead_letter_id: str = "dl-1") -> DeadLetter:
    return dead_letter(dead_letter_id)


@pytest.fixture
async def task_errors(async_mongo_db):
    await ensure_indexes(async_mongo_db)
    return async_mongo_db[TASK_ERRORS]


async def broker_rejected(broker, body: bytes, headers: dict) -> None:
    """A message on the ingest queue that a consumer rejects without requeue: the broker
    dead-letters it through the queue's x-dead-letter-exchange."""
    await broker.publisher.publish_bytes(EXCHANGE_TASKS, ROUTING_INGEST, body, headers=headers, message_id="msg-1")
    message = await next_message(broker.queues[QUEUE_INGEST], no_ack=False)
    await message.reject(requeue=False)


async def test_a_service_dead_letter_is_recorded_once_under_its_id(broker, task_errors) -> None:
    await broker.publisher.publish(letter("dl-service-1"))
    message = await next_message(broker.queues[QUEUE_DLQ])
    recorder = ErrorRecorder(task_errors)

    first = await recorder.record(message)
    second = await recorder.record(message)

    assert first["_id"] == second["_id"] == "dl-service-1"
    documents = await task_errors.find({}).to_list()
    assert len(documents) == 1
    document = documents[0]
    assert document["_id"] == "dl-service-1"
    assert (document["kind"], document["reason"], document["status"]) == ("service", "non_retryable", "open")
    assert (document["job_id"], document["shard_key"], document["attempts"]) == ("job-1", "job-1:0002", 1)
    assert document["error_type"] == "NonRetryableError"
    assert document["original"]["headers"] == {"task": "cairn.ingest.run_shard"}
    assert document["replays"] == []
    assert document["created_at"] is not None


async def test_a_message_the_broker_dead_lettered_is_recorded_once_as_rejected(broker, task_errors) -> None:
    body = json.dumps([[], {"job_id": "job-2", "shard_key": "job-2:0001"}, {}]).encode()
    await broker_rejected(broker, body, {"task": "cairn.ingest.run_shard", "id": "task-1"})
    message = await next_message(broker.queues[QUEUE_DLQ])
    assert message.headers["x-death"][0]["reason"] == "rejected"
    recorder = ErrorRecorder(task_errors)

    await recorder.record(message)
    await recorder.record(message)

    documents = await task_errors.find({}).to_list()
    assert len(documents) == 1
    document = documents[0]
    assert document["_id"].startswith("broker-")
    assert (document["kind"], document["reason"], document["source_queue"]) == ("broker", "rejected", QUEUE_INGEST)
    assert (document["job_id"], document["shard_key"]) == ("job-2", "job-2:0001")  # from the Celery task's kwargs
    assert document["attempts"] == 1
    assert document["death_headers"][0]["queue"] == QUEUE_INGEST
    assert document["original"]["body"] == body.decode()


async def test_a_redelivered_broker_dead_letter_keeps_its_id(broker, task_errors) -> None:
    await broker_rejected(broker, b"raw payload", {})
    recorder = ErrorRecorder(task_errors)
    first_delivery = await next_message(broker.queues[QUEUE_DLQ], no_ack=False)
    first = await recorder.record(first_delivery)
    await first_delivery.nack(requeue=True)  # as if the handler died before its ack

    again = await next_message(broker.queues[QUEUE_DLQ], no_ack=False)
    second = await recorder.record(again)
    await again.ack()

    assert again.redelivered
    assert first["_id"] == second["_id"]
    assert await task_errors.count_documents({}) == 1
    assert (await task_errors.find_one({}))["job_id"] is None


async def test_different_broker_dead_letters_get_different_ids(broker, task_errors) -> None:
    recorder = ErrorRecorder(task_errors)
    for body in (b"first", b"second"):
        await broker_rejected(broker, body, {})
        await recorder.record(await next_message(broker.queues[QUEUE_DLQ]))

    assert await task_errors.count_documents({"kind": "broker"}) == 2


async def test_two_celery_tasks_of_one_shard_rejected_together_are_two_records(broker, task_errors, test_env) -> None:
    # Celery's task messages (kombu) carry no message_id; the task id is the correlation id and
    # the `id` header. Two tasks for the same shard have the same body.
    body = json.dumps([[], {"job_id": "job-3", "shard_key": "job-3:0000"}, {}])
    with kombu.Connection(test_env.amqp_url) as connection:
        producer = connection.Producer()
        for task_id in ("task-a", "task-b"):
            producer.publish(
                body,
                exchange=EXCHANGE_TASKS,
                routing_key=ROUTING_INGEST,
                headers={"task": "cairn.ingest.run_shard", "id": task_id},
                correlation_id=task_id,
                content_type="application/json",
                content_encoding="utf-8",
            )
    recorder = ErrorRecorder(task_errors)
    for _ in range(2):
        rejected = await next_message(broker.queues[QUEUE_INGEST], no_ack=False)
        assert rejected.message_id is None
        await rejected.reject(requeue=False)
    for _ in range(2):
        await recorder.record(await next_message(broker.queues[QUEUE_DLQ]))

    assert await task_errors.count_documents({"shard_key": "job-3:0000"}) == 2


async def test_an_envelope_that_does_not_validate_is_recorded_as_raw(broker, task_errors) -> None:
    await broker.publisher.publish_bytes(
        EXCHANGE_DLX, QUEUE_INGEST, b'{"dead_letter_id": "x"}', headers={HEADER_MESSAGE_TYPE: DeadLetter.message_type}
    )
    message = await next_message(broker.queues[QUEUE_DLQ])

    document = error_document(message)

    assert document["kind"] == "broker"
    assert document["reason"] == "unknown"  # no x-death: nobody said why
    assert document["original"]["body"] == '{"dead_letter_id": "x"}'


async def test_the_handler_records_and_acks_what_reaches_the_dlq(broker, async_mongo_db, test_env) -> None:
    settings = DlqSettings(mongodb_uri=test_env.mongodb_uri, mongodb_database=async_mongo_db.name, amqp_url=test_env.amqp_url)
    stop = asyncio.Event()
    handler = asyncio.create_task(run(settings, stop))
    try:
        await broker.publisher.publish(letter("dl-running-1"))
        async with asyncio.timeout(10):
            while await async_mongo_db[TASK_ERRORS].find_one({"_id": "dl-running-1"}) is None:
                assert not handler.done(), handler
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await handler

    assert (await async_mongo_db[TASK_ERRORS].find_one({"_id": "dl-running-1"}))["reason"] == "non_retryable"
    assert await broker.queues[QUEUE_DLQ].get(fail=False) is None  # acked, not left behind
