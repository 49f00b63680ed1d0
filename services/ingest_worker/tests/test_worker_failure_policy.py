"""Failure classification and the retry policy: HTTP statuses, pipeline declarations, job policy,
backoff bounds, the retry record on the shard, and the fault flag of the synthetic pipeline."""

import importlib
import random
from datetime import UTC, datetime

import pytest
from kombu import Message
from pymongo.errors import ExecutionTimeout, OperationFailure

from cairn_contracts.jobs import RetryPolicy
from cairn_contracts.pipelines import SYNTHETIC
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, MAIN_SUB_KEY, SHARDS
from cairn_ingest_worker import pipelines
from cairn_ingest_worker.consumer import original_of_kombu
from cairn_ingest_worker.errors import (
    FailurePolicy,
    HttpStatusError,
    NonRetryableError,
    RetryableError,
    classify_http_status,
    is_retryable,
)
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.pipelines import build_pipeline, failure_policy, register_pipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline
from cairn_ingest_worker.retry import (
    RETRIES_KEPT,
    EffectiveRetryPolicy,
    RetryDefaults,
    backoff_ceiling,
    decide,
    resolve_policy,
    retry_fields,
    rules_for_job,
)
from cairn_sdk import Bounds, RunContext

DEFAULTS = RetryDefaults(max_attempts=5, base_delay_s=1.0, max_delay_s=60.0)


# --- HTTP sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 408, 425, 500, 502, 503, 504, 507, 599])
def test_throttling_timeouts_and_server_errors_are_retryable(status: int) -> None:
    assert classify_http_status(status) is True
    assert is_retryable(HttpStatusError(status)) is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 451, 501, 505])
def test_client_errors_and_permanent_server_answers_are_not_retryable(status: int) -> None:
    assert classify_http_status(status) is False
    assert is_retryable(HttpStatusError(status, "nope")) is False


@pytest.mark.parametrize("status", [200, 204, 301, 304, 399, 600, 99])
def test_a_status_that_is_not_an_error_cannot_be_classified(status: int) -> None:
    with pytest.raises(ValueError):
        classify_http_status(status)


def test_retry_after_lengthens_the_delay_up_to_the_max() -> None:
    policy = EffectiveRetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=30)

    assert decide(HttpStatusError(429, retry_after_s=12), 1, policy).delay_s == 12
    assert decide(HttpStatusError(503, retry_after_s=3600), 1, policy).delay_s == 30
    assert decide(HttpStatusError(503), 1, policy, rng=random.Random(1)).delay_s <= 0.1


# --- what a pipeline declares -----------------------------------------------------------------------


class QuotaExceeded(Exception):
    pass


def test_a_pipeline_declaration_wins_over_the_defaults_retryable_first() -> None:
    declared = FailurePolicy(retryable=(QuotaExceeded,), non_retryable=(TimeoutError, QuotaExceeded))

    assert is_retryable(QuotaExceeded()) is True  # unknown: retryable by default
    assert is_retryable(TimeoutError()) is True
    assert is_retryable(TimeoutError(), declared) is False
    assert is_retryable(QuotaExceeded(), declared) is True  # listed in both: retryable is checked first
    assert is_retryable(ValueError(), declared) is False  # falls through to the defaults
    assert is_retryable(NonRetryableError(), declared) is False and is_retryable(RetryableError(), declared) is True


def test_mongo_range_treats_a_refused_query_as_permanent_but_its_timeouts_as_transient() -> None:
    declared = failure_policy("mongo_range")

    assert is_retryable(OperationFailure("not authorized", code=13), declared) is False
    assert is_retryable(ExecutionTimeout("slow", code=50), declared) is True
    assert is_retryable(OperationFailure("not authorized", code=13), failure_policy("synthetic")) is True
    assert failure_policy("no_such_pipeline") == FailurePolicy()


# --- the policy -------------------------------------------------------------------------------------


def test_policy_fields_come_from_the_job_then_the_pipeline_then_the_worker() -> None:
    pipeline = RetryPolicy(max_attempts=8, base_delay_s=2.0)

    assert resolve_policy(None, None, DEFAULTS) == EffectiveRetryPolicy(5, 1.0, 60.0)
    assert resolve_policy(None, pipeline, DEFAULTS) == EffectiveRetryPolicy(8, 2.0, 60.0)
    assert resolve_policy({"max_attempts": 3}, pipeline, DEFAULTS) == EffectiveRetryPolicy(3, 2.0, 60.0)
    assert resolve_policy(RetryPolicy(max_delay_s=5), pipeline, DEFAULTS) == EffectiveRetryPolicy(8, 2.0, 5.0)
    # A pipeline declares its default in its FailurePolicy (cairn_sdk).
    declared = FailurePolicy(max_attempts=8, base_delay_s=2.0)
    assert resolve_policy({"max_attempts": 3}, declared, DEFAULTS) == EffectiveRetryPolicy(3, 2.0, 60.0)


def test_the_rules_of_a_recorded_job(mongo_db) -> None:
    mongo_db[JOBS].insert_one({"_id": "j1", "spec": {"pipeline": "mongo_range", "retry": {"max_attempts": 9, "base_delay_s": None}}})
    mongo_db[JOBS].insert_one({"_id": "j2", "spec": {"pipeline": "synthetic", "retry": None}})

    rules = rules_for_job(mongo_db[JOBS], "j1", DEFAULTS)
    assert rules.policy == EffectiveRetryPolicy(9, 1.0, 60.0)
    assert rules.declared == failure_policy("mongo_range")
    assert rules_for_job(mongo_db[JOBS], "j2", DEFAULTS).policy == EffectiveRetryPolicy(5, 1.0, 60.0)
    assert rules_for_job(mongo_db[JOBS], "unknown", DEFAULTS).policy == EffectiveRetryPolicy(5, 1.0, 60.0)


@pytest.mark.parametrize("attempt", range(1, 9))
def test_retry_delays_are_full_jitter_under_a_growing_capped_ceiling(attempt: int) -> None:
    policy = EffectiveRetryPolicy(max_attempts=10, base_delay_s=0.2, max_delay_s=2.0)
    rng = random.Random(attempt)

    decisions = [decide(RetryableError("x"), attempt, policy, rng=rng) for _ in range(200)]

    ceiling = min(2.0, 0.2 * 2 ** (attempt - 1))
    assert all(d.retry and d.ceiling_s == ceiling and 0 <= d.delay_s <= ceiling for d in decisions)
    assert max(d.delay_s for d in decisions) > ceiling / 2, "the delays do not spread over the range"
    assert backoff_ceiling(attempt, 0.2, 2.0) == ceiling


def test_the_last_attempt_and_non_retryable_errors_are_dead_lettered() -> None:
    policy = EffectiveRetryPolicy(max_attempts=3, base_delay_s=0.2, max_delay_s=2.0)

    assert decide(RetryableError("x"), 2, policy).retry is True
    exhausted = decide(RetryableError("x"), 3, policy)
    assert not exhausted.retry and exhausted.retryable and exhausted.dead_letter_reason == "retries_exhausted"
    permanent = decide(NonRetryableError("x"), 1, policy)
    assert not permanent.retry and not permanent.retryable and permanent.dead_letter_reason == "non_retryable"


def test_the_retry_record_and_its_bounded_history() -> None:
    decision = decide(RetryableError("boom"), 2, EffectiveRetryPolicy(4, 1.0, 8.0), rng=random.Random(3))
    record = decision.record("RetryableError: boom", now_ms=1_000)

    assert record == {
        "attempt": 2,
        "max_attempts": 4,
        "delay_s": round(decision.delay_s, 6),
        "ceiling_s": 2.0,
        "error": "RetryableError: boom",
        "at_ms": 1_000,
        "retry_at_ms": 1_000 + int(decision.delay_s * 1000),
    }
    history = [{"attempt": n} for n in range(1, 40)]
    fields = retry_fields({"retries": ["legacy text", *history]}, record)
    assert len(fields["retries"]) == RETRIES_KEPT
    assert fields["retries"][-1] == record and fields["retries"][0] == {"attempt": 21}
    assert fields["retry"] == record


def _seed_running_shard(db) -> ShardLeases:
    db[CHECKPOINTS].insert_one(
        {"_id": f"s:0/{MAIN_SUB_KEY}", "shard_key": "s:0", "sub_key": MAIN_SUB_KEY, "job_id": "s", "cursor": 0, "fencing_token": 0}
    )
    db[SHARDS].insert_one({"_id": "s:0", "shard_key": "s:0", "job_id": "s", "state": ShardState.QUEUED, "attempts": 0, "fencing_token": 0})
    return ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30)


def test_each_scheduled_retry_is_recorded_on_the_shard_in_the_fenced_write(mongo_db) -> None:
    leases = _seed_running_shard(mongo_db)
    policy = EffectiveRetryPolicy(max_attempts=5, base_delay_s=0.2, max_delay_s=2.0)
    for attempt in (1, 2):
        claim = leases.claim("s:0")
        decision = decide(RetryableError("down"), claim.attempt, policy)
        assert leases.schedule_retry(claim, "down", datetime.now(UTC), extra=retry_fields(claim.shard, decision.record("down")))
        assert claim.attempt == attempt

    shard = mongo_db[SHARDS].find_one({"_id": "s:0"})
    assert shard["state"] == ShardState.RETRY
    assert [r["attempt"] for r in shard["retries"]] == [1, 2] and shard["retry"]["attempt"] == 2
    assert [r["ceiling_s"] for r in shard["retries"]] == [0.2, 0.4]

    stale = leases.claim("s:0")
    newer = ShardLeases(mongo_db[SHARDS], mongo_db[CHECKPOINTS], "worker-b", ttl_s=30)
    mongo_db[SHARDS].update_one({"_id": "s:0"}, {"$set": {"lease_until": 0}})  # the lease expired
    assert newer.claim("s:0") is not None
    assert not leases.schedule_retry(stale, "late", datetime.now(UTC), extra=retry_fields(stale.shard, {"attempt": 99}))
    assert [r["attempt"] for r in mongo_db[SHARDS].find_one({"_id": "s:0"})["retries"]] == [1, 2]


# --- the pipeline registry and the suite's test pipeline (tests-e2e/flaky_source.py) -----------------


def test_only_a_pipeline_class_named_as_registered_can_be_registered() -> None:
    with pytest.raises(ValueError, match="whose name is 'not_its_name'"):
        register_pipeline("not_its_name", SyntheticPipeline)
    with pytest.raises(ValueError):
        register_pipeline("synthetic", dict)  # type: ignore[arg-type]


def test_the_built_in_pipelines_are_discovered_from_entry_points() -> None:
    discovered = pipelines.discover()

    assert discovered[SYNTHETIC] is SyntheticPipeline
    assert discovered["mongo_range"].__name__ == "MongoRangePipeline"


def test_the_test_pipeline_fails_its_source_until_it_is_marked_fixed(mongo_db, monkeypatch) -> None:
    # Importing it registers it for `synthetic`: the registry is restored after this test.
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    flaky_source = importlib.import_module("flaky_source")
    importlib.reload(flaky_source)  # registers again in this test's registry, if imported before
    params = {"count": 20, "fail_at_key": 5, "failure": "retryable", "key_prefix": "down"}
    pipeline = build_pipeline(SYNTHETIC, params, RunContext(source_db=mongo_db))
    assert type(pipeline).__name__ == "FlakySyntheticPipeline"
    bounds = Bounds(0, 20)

    with pytest.raises(RetryableError):  # not fixed yet: fails as the production pipeline does
        pipeline.read(bounds, 0, 10)
    assert len(pipeline.read(bounds, 10, 10).records) == 10  # only the batch holding the key fails
    mongo_db[flaky_source.FIXED_SOURCES].insert_one({"_id": "down"})
    assert len(pipeline.read(bounds, 0, 10).records) == 10


# --- messages Celery cannot read ----------------------------------------------------------------------


def test_an_unreadable_message_is_kept_as_it_came_for_the_dead_letter() -> None:
    message = Message(
        body=b"\xff\x00binary",
        content_type="application/x-thing",
        headers={"x-trace": b"abc", "nested": {"n": [1, b"2"]}},
        delivery_info={"routing_key": "ingest"},
    )

    original = original_of_kombu(message)

    assert original.body_encoding == "base64" and original.body == "/wBiaW5hcnk="
    assert original.headers["x-trace"] == "abc" and original.headers["nested"] == {"n": [1, "2"]}
    assert original.headers["content_type"] == "application/x-thing"
    assert original.routing_key == "ingest"
    assert original_of_kombu(Message(body=b'{"a": 1}', content_type="application/json")).body == '{"a": 1}'
