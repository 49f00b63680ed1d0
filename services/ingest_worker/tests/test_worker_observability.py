"""What the worker tells operators: lease take-overs, per-task log context, queue wait, task
durations and the running-tasks gauge (Celery's own signals, with eagerly applied tasks)."""

import time

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from cairn_contracts.store import CHECKPOINTS, SHARDS
from cairn_contracts.topology import HEADER_ENQUEUED_AT
from cairn_ingest_worker import observability
from cairn_ingest_worker.leases import ShardLeases
from cairn_runtime import log

TINY_TTL_S = 0.05


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def leases(db, worker: str, ttl_s: float = 30.0) -> ShardLeases:
    return ShardLeases(db[SHARDS], db[CHECKPOINTS], worker, ttl_s)


# --------------------------------------------------------------------------------- leases
def test_taking_over_an_expired_lease_is_counted_as_a_takeover(db, seed_shard) -> None:
    key = seed_shard(db, "job-to", 0, 0, 10)
    before = sample("cairn_lease_takeovers_total")

    first = leases(db, "worker-a", TINY_TTL_S).claim(key)
    assert first is not None and not first.reclaimed
    time.sleep(TINY_TTL_S * 3)
    second = leases(db, "worker-b").claim(key)

    assert second is not None and second.reclaimed
    assert (second.token, second.attempt) == (2, 2)  # the claim's document is the one after the update
    assert second.shard["taken_by"] == "worker-b" and second.shard["state"] == "RUNNING"
    assert sample("cairn_lease_takeovers_total") == before + 1


def test_a_handed_off_lease_is_taken_without_counting_a_takeover(db, seed_shard) -> None:
    key = seed_shard(db, "job-ho", 0, 0, 10)
    holder = leases(db, "worker-a")
    claim = holder.claim(key)
    assert holder.hand_off(claim)
    before = sample("cairn_lease_takeovers_total")

    continued = leases(db, "worker-b").claim(key)

    assert continued is not None and not continued.reclaimed
    assert sample("cairn_lease_takeovers_total") == before


# --------------------------------------------------------------------------------- task signals
@pytest.fixture(scope="module")
def app() -> Celery:
    app = Celery("cairn-worker-observability-tests")
    app.conf.task_always_eager = False
    observability.connect_signals()

    @app.task(name="tests.run_shard", bind=True)
    def run_shard(self, **payload):
        observability.note_shard(
            job_id=payload["job_id"], shard_key=payload["shard_key"], pipeline="synthetic", tenant="acme", attempt=1
        )
        seen = (log.job_id.get(), log.shard_key.get(), log.correlation_id.get(), observability.current_pipeline())
        if payload.get("fail"):
            raise RuntimeError("boom")
        return seen

    @app.task(name="tests.named_outcome")
    def named_outcome(**payload):
        return payload["outcome"]

    return app


def context() -> tuple[str | None, str | None, str | None]:
    return log.job_id.get(), log.shard_key.get(), log.correlation_id.get()


def test_a_task_runs_with_its_job_and_shard_in_the_log_context_and_restores_it_after(app) -> None:
    before = context()

    result = app.tasks["tests.run_shard"].apply(kwargs={"job_id": "j7", "shard_key": "j7:0001"})

    assert tuple(result.get()) == ("j7", "j7:0001", "j7", "synthetic")  # correlation id = job id
    assert context() == before


def test_task_durations_are_observed_by_outcome_and_the_gauge_returns_to_zero(app) -> None:
    labels = {"task": "tests.named_outcome", "outcome": "already_done"}
    failed = {"task": "tests.run_shard", "outcome": "failure"}
    done, failures = sample("cairn_shard_run_duration_seconds_count", labels), sample("cairn_shard_run_duration_seconds_count", failed)
    before = context()

    app.tasks["tests.named_outcome"].apply(kwargs={"outcome": "already_done"})
    app.tasks["tests.run_shard"].apply(kwargs={"job_id": "j8", "shard_key": "j8:0000", "fail": True})

    assert sample("cairn_shard_run_duration_seconds_count", labels) == done + 1
    assert sample("cairn_shard_run_duration_seconds_count", failed) == failures + 1
    assert sample("cairn_worker_tasks_running") == 0
    assert context() == before  # restored after a failing task too


def test_queue_wait_is_observed_from_the_enqueue_time_the_message_carries(app) -> None:
    count, total = sample("cairn_task_queue_wait_seconds_count"), sample("cairn_task_queue_wait_seconds_sum")

    app.tasks["tests.named_outcome"].apply(kwargs={"outcome": "x"}, headers={HEADER_ENQUEUED_AT: time.time() - 2.0})
    app.tasks["tests.named_outcome"].apply(kwargs={"outcome": "x"})  # says nothing: not observed

    assert sample("cairn_task_queue_wait_seconds_count") == count + 1
    assert 2.0 <= sample("cairn_task_queue_wait_seconds_sum") - total < 3.0
