"""Large original bodies go to GridFS (RawPayload) with a pointer in task_errors; entries note
their job's pipeline and tenant. Real broker messages, real MongoDB-wire server."""

import base64
import hashlib
import os

import pytest

from cairn_contracts.messages import DeadLetter, OriginalMessage
from cairn_contracts.store import JOBS, RAW_PAYLOADS, TASK_ERRORS
from cairn_contracts.topology import EXCHANGE_TASKS, QUEUE_DLQ, QUEUE_INGEST, ROUTING_INGEST
from cairn_dlq_handler.recorder import ErrorRecorder
from cairn_runtime.mongo import ensure_indexes
from cairn_runtime.payloads import RawPayloads
from cairn_testkit.aio import next_message

THRESHOLD = 4096


@pytest.fixture
async def db(async_mongo_db):
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[JOBS].insert_one({"_id": "job-p", "tenant": "acme", "pipeline": "mongo_range"})
    return async_mongo_db


@pytest.fixture
def recorder(db) -> ErrorRecorder:
    return ErrorRecorder(db[TASK_ERRORS], jobs=db[JOBS], payloads=RawPayloads(db), raw_payload_threshold_bytes=THRESHOLD)


def envelope(letter_id: str, body: bytes, job_id: str | None = "job-p") -> DeadLetter:
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode(), "base64"
    return DeadLetter(
        dead_letter_id=letter_id,
        source_service="tests",
        source_queue=QUEUE_INGEST,
        reason="non_retryable",
        error_type="ValueError",
        error_message="bad",
        job_id=job_id,
        shard_key=f"{job_id}:0000" if job_id else None,
        original=OriginalMessage(body=text, body_encoding=encoding),  # type: ignore[arg-type]
    )


async def recorded(broker, recorder: ErrorRecorder, letter: DeadLetter) -> dict:
    await broker.publisher.publish(letter)
    return await recorder.record(await next_message(broker.queues[QUEUE_DLQ]))


async def test_a_large_body_goes_to_gridfs_and_the_entry_keeps_a_pointer(broker, db, recorder) -> None:
    body = os.urandom(THRESHOLD * 3)  # binary: travels base64-encoded, stored as the raw bytes

    await recorded(broker, recorder, envelope("dl-big", body))

    entry = await db[TASK_ERRORS].find_one({"_id": "dl-big"})
    ref = entry["original"]["payload_ref"]
    assert entry["original"]["body"] is None and entry["raw_payload_id"] == ref["raw_payload_id"]
    assert ref["size"] == len(body) and ref["sha256"] == hashlib.sha256(body).hexdigest()
    assert len(entry["original"]["body_preview"]) <= 1024
    meta = await db[RAW_PAYLOADS].find_one({"_id": ref["raw_payload_id"]})
    assert meta["task_error_id"] == "dl-big" and meta["storage"] == "gridfs" and meta["encoding"] == "base64"
    assert await RawPayloads(db).read(ref["raw_payload_id"]) == body


async def test_a_small_body_stays_in_the_entry(broker, db, recorder) -> None:
    await recorded(broker, recorder, envelope("dl-small", b'{"job_id": "job-p"}'))

    entry = await db[TASK_ERRORS].find_one({"_id": "dl-small"})
    assert entry["original"]["body"] == '{"job_id": "job-p"}' and "payload_ref" not in entry["original"]
    assert await db[RAW_PAYLOADS].count_documents({}) == 0


async def test_a_redelivered_large_dead_letter_is_stored_once(broker, db, recorder) -> None:
    letter = envelope("dl-again", b"y" * (THRESHOLD + 1))
    await broker.publisher.publish(letter)
    message = await next_message(broker.queues[QUEUE_DLQ])

    await recorder.record(message)
    await db[TASK_ERRORS].delete_one({"_id": "dl-again"})  # as if the handler died before its insert
    await recorder.record(message)
    await recorder.record(message)

    assert await db[TASK_ERRORS].count_documents({"_id": "dl-again"}) == 1
    assert await db[RAW_PAYLOADS].count_documents({"task_error_id": "dl-again"}) == 1


async def test_a_large_message_dead_lettered_by_the_broker_is_kept_aside_too(broker, db, recorder) -> None:
    body = b"z" * (THRESHOLD * 2)
    await broker.publisher.publish_bytes(EXCHANGE_TASKS, ROUTING_INGEST, body, headers={}, message_id="big-1")
    await (await next_message(broker.queues[QUEUE_INGEST], no_ack=False)).reject(requeue=False)

    document = await recorder.record(await next_message(broker.queues[QUEUE_DLQ]))

    entry = await db[TASK_ERRORS].find_one({"_id": document["_id"]})
    assert entry["kind"] == "broker" and entry["original"]["payload_ref"]["size"] == len(body)
    assert await RawPayloads(db).read(entry["raw_payload_id"]) == body


async def test_entries_note_the_pipeline_and_tenant_of_their_job(broker, db, recorder) -> None:
    await recorded(broker, recorder, envelope("dl-job", b"{}"))
    await recorded(broker, recorder, envelope("dl-nojob", b"{}", job_id=None))

    with_job = await db[TASK_ERRORS].find_one({"_id": "dl-job"})
    assert (with_job["pipeline"], with_job["tenant"]) == ("mongo_range", "acme")
    without = await db[TASK_ERRORS].find_one({"_id": "dl-nojob"})
    assert (without["pipeline"], without["tenant"]) == (None, "default")
