"""The DLQ handler's metrics and trace: each dead letter counted once, consumed in its trace."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from cairn_contracts.messages import DeadLetter
from cairn_contracts.store import TASK_ERRORS
from cairn_contracts.topology import QUEUE_DLQ, QUEUE_INGEST
from cairn_dlq_handler.recorder import ErrorRecorder
from cairn_runtime import log
from cairn_runtime.consumer import consuming
from cairn_runtime.mongo import ensure_indexes
from cairn_testkit.aio import next_message
from cairn_testkit.records import dead_letter

LABELS = {"reason": "retries_exhausted", "source_queue": QUEUE_INGEST, "kind": "service"}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def letter(dead_letter_id: str) -> DeadLetter:
    return dead_letter(
        dead_letter_id, reason="retries_exhausted", error_type="RetryableError", job_id="job-dl", shard_key="job-dl:0001", attempts=3
    )


@pytest.fixture
async def task_errors(async_mongo_db):
    await ensure_indexes(async_mongo_db)
    return async_mongo_db[TASK_ERRORS]


async def test_a_dead_letter_is_counted_once_however_often_it_arrives(broker, task_errors) -> None:
    await broker.publisher.publish(letter("dl-count-1"))
    message = await next_message(broker.queues[QUEUE_DLQ])
    recorder = ErrorRecorder(task_errors)
    recorded, redelivered = sample("cairn_dead_letters_total", LABELS), sample("cairn_dead_letter_redeliveries_total")

    await recorder.record(message)
    await recorder.record(message)

    assert sample("cairn_dead_letters_total", LABELS) == recorded + 1
    assert sample("cairn_dead_letter_redeliveries_total") == redelivered + 1


async def test_the_dead_letter_is_consumed_in_the_trace_of_the_work_that_gave_up(broker, task_errors) -> None:
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("run/cairn.ingest.run_shard") as task_span:
        await broker.publisher.publish(letter("dl-trace-1"))
        trace_id = task_span.get_span_context().trace_id
    message = await next_message(broker.queues[QUEUE_DLQ])
    seen = []

    with consuming(message, QUEUE_DLQ):
        consumer_context = trace.get_current_span().get_span_context()
        await ErrorRecorder(task_errors).record(message)
        seen.append((log.job_id.get(), log.shard_key.get()))

    assert consumer_context.trace_id == trace_id  # whatever provider is set: the context travels
    assert seen == [("job-dl", "job-dl:0001")]
    assert (log.job_id.get(), log.shard_key.get()) == (None, None)
