"""The scheduler's metrics against the real broker and MongoDB-wire server: queue depths, jobs and
shards by state, backlog age, job durations, and what every Celery task message carries."""

import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from cairn_contracts.clock import stored_ms
from cairn_contracts.messages import RunShard, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import JOBS, SHARDS
from cairn_contracts.topology import (
    HEADER_ENQUEUED_AT,
    QUEUE_DLQ,
    QUEUE_INGEST,
    QUEUE_SCHEDULER_COMMANDS,
)
from cairn_runtime.celery_config import ShardTaskSender, celery_config
from cairn_runtime.instrumentation import instrument_celery
from cairn_scheduler.gauges import GaugeCollector, backlog_age_s
from cairn_scheduler.jobs import JobScheduler
from cairn_testkit.aio import next_message


def sample(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def start_command(job_id: str) -> StartJob:
    return StartJob.model_validate(
        {"job_id": job_id, "tenant": "default", "spec": {"pipeline": "synthetic", "params": {"count": 3}}}
    )


# --------------------------------------------------------------------------------- broker
async def test_queue_depths_come_from_the_broker(broker, db) -> None:
    for index in range(3):
        await broker.publisher.publish(start_command(f"job-{index}"))
    collector = GaugeCollector(db, broker.connection)

    assert await collector.collect_once()

    assert sample("cairn_queue_messages", {"queue": QUEUE_SCHEDULER_COMMANDS}) == 3
    assert sample("cairn_queue_messages", {"queue": QUEUE_DLQ}) == 0
    assert sample("cairn_queue_consumers", {"queue": QUEUE_SCHEDULER_COMMANDS}) == 0

    await broker.queues[QUEUE_SCHEDULER_COMMANDS].purge()
    assert await collector.collect_once()
    assert sample("cairn_queue_messages", {"queue": QUEUE_SCHEDULER_COMMANDS}) == 0


async def test_a_missing_queue_fails_the_pass_but_not_the_next_one(broker, db) -> None:
    failed_before = sample("cairn_gauge_collections_total", {"outcome": "failed"}) or 0
    broken = GaugeCollector(db, broker.connection, queues=["cairn.no-such-queue"])
    assert not await broken.collect_once()
    assert sample("cairn_gauge_collections_total", {"outcome": "failed"}) == failed_before + 1

    working = GaugeCollector(db, broker.connection, queues=[QUEUE_INGEST])
    assert await working.collect_once()
    broken._queues = (QUEUE_INGEST,)  # the channel the failed declare closed is reopened
    assert await broken.collect_once()


async def test_every_celery_task_message_carries_its_enqueue_time_and_trace_context(broker, test_env) -> None:
    instrument_celery()
    app = Celery("cairn-scheduler-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    # routed by queue: through the default exchange, labelled with the queue
    confirmed = sample("cairn_publish_confirm_seconds_count", {"exchange": QUEUE_INGEST}) or 0
    tracer = TracerProvider().get_tracer("tests")
    try:
        with tracer.start_as_current_span("consume cairn.scheduler.commands") as span:
            sent_after = time.time()
            await ShardTaskSender(app).dispatch(RunShard(job_id="job-t", shard_key="job-t:0000"), priority=2)
            trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        app.close()

    message = await next_message(broker.queues[QUEUE_INGEST])
    assert sent_after <= float(message.headers[HEADER_ENQUEUED_AT]) <= time.time()
    assert message.headers["traceparent"].split("-")[1] == trace_id
    assert sample("cairn_publish_confirm_seconds_count", {"exchange": QUEUE_INGEST}) == confirmed + 1


# --------------------------------------------------------------------------------- store
async def test_jobs_and_shards_are_counted_by_state_with_zero_for_empty_states(broker, db) -> None:
    await db[JOBS].insert_many(
        [{"_id": f"j{i}", "state": state} for i, state in enumerate([JobState.STARTED, JobState.STARTED, JobState.FAILURE])]
    )
    await db[SHARDS].insert_many(
        [
            {"_id": f"j0:{i:04d}", "shard_key": f"j0:{i:04d}", "state": state}
            for i, state in enumerate([ShardState.QUEUED, ShardState.RUNNING, ShardState.RUNNING, ShardState.FAILED])
        ]
    )

    assert await GaugeCollector(db, broker.connection).collect_once()

    jobs = {s.value: sample("cairn_jobs", {"state": s.value}) for s in JobState}  # every state has a sample
    assert jobs == {**dict.fromkeys(jobs, 0), "STARTED": 2, "FAILURE": 1}
    assert sample("cairn_shards", {"state": "RUNNING"}) == 2
    assert sample("cairn_shards", {"state": "QUEUED"}) == 1
    assert sample("cairn_shards", {"state": "SUCCEEDED"}) == 0


async def test_backlog_age_is_the_oldest_queued_shard_s_wait(broker, db) -> None:
    now = datetime.now(UTC)
    await db[SHARDS].insert_many(
        [
            {"_id": "a", "shard_key": "a", "state": ShardState.QUEUED, "queued_at_ms": int((now - timedelta(seconds=40)).timestamp() * 1000)},
            {"_id": "b", "shard_key": "b", "state": ShardState.QUEUED, "queued_at_ms": int((now - timedelta(seconds=5)).timestamp() * 1000)},
            {"_id": "c", "shard_key": "c", "state": ShardState.RUNNING, "queued_at_ms": 0},
        ]
    )
    collector = GaugeCollector(db, broker.connection)
    await collector.collect_backlog_age()
    assert 40 <= sample("cairn_oldest_queued_shard_age_seconds") < 45

    await db[SHARDS].delete_many({"state": ShardState.QUEUED})
    await collector.collect_backlog_age()
    assert sample("cairn_oldest_queued_shard_age_seconds") == 0


def test_stored_moments_are_read_in_every_form_a_server_keeps_them() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ms = int(moment.timestamp()) * 1000
    assert stored_ms(moment) == ms
    assert stored_ms(moment.replace(tzinfo=None)) == ms  # naive: UTC
    assert stored_ms("2026-01-02T03:04:05+00:00") == ms  # the stand-in's $set text
    assert stored_ms("2026-01-02T03:04:05Z") == ms
    assert stored_ms("2026-01-02T03:04:05") == ms
    assert stored_ms(ms) == ms  # *_ms fields
    assert stored_ms("soon") is None and stored_ms(None) is None and stored_ms(True) is None

    assert backlog_age_s(None, 100.0) == 0.0
    assert backlog_age_s({"queued_at": "1970-01-01T00:01:00+00:00"}, 100.0) == 40.0
    assert backlog_age_s({"queued_at_ms": 90_000, "queued_at": "1970-01-01T00:00:00+00:00"}, 100.0) == 10.0
    assert backlog_age_s({}, 100.0) == 0.0


# --------------------------------------------------------------------------------- job duration
class NoDispatch:
    async def dispatch(self, task, priority: int) -> None:  # a job whose shards are already terminal
        raise AssertionError("nothing is dispatched by a roll-up")


async def test_a_job_s_duration_is_observed_once_when_it_becomes_terminal(db) -> None:
    created = datetime.now(UTC) - timedelta(seconds=30)
    await db[JOBS].insert_one(
        {"_id": "jd", "tenant": "default", "pipeline": "synthetic", "state": JobState.STARTED, "shard_count": 2, "created_at": created}
    )
    await db[SHARDS].insert_many(
        [
            {"_id": "jd:0000", "shard_key": "jd:0000", "job_id": "jd", "state": ShardState.SUCCEEDED},
            {"_id": "jd:0001", "shard_key": "jd:0001", "job_id": "jd", "state": ShardState.FAILED},
        ]
    )
    labels = {"pipeline": "synthetic", "state": "FAILURE"}
    count = sample("cairn_job_duration_seconds_count", labels) or 0
    total = sample("cairn_job_duration_seconds_sum", labels) or 0
    scheduler = JobScheduler(db, NoDispatch())

    assert await scheduler.roll_up("jd") == JobState.FAILURE
    assert await scheduler.roll_up("jd") is None  # already terminal: not observed again

    assert sample("cairn_job_duration_seconds_count", labels) == count + 1
    assert 30 <= sample("cairn_job_duration_seconds_sum", labels) - total < 40
