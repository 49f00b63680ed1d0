"""The worker's decisions once a run has ended (decisions.py): plain values, no Celery, no services."""

import random

import pytest

from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.states import ShardState
from cairn_ingest_worker.decisions import (
    SLICE_OVER,
    Ack,
    Announce,
    DeadLetter,
    RetryLater,
    ScheduleRetry,
    after_failure,
    after_run,
    after_store_outage,
    for_empty_lane,
    for_unclaimable,
)
from cairn_ingest_worker.errors import NonRetryableError, RetryableError
from cairn_ingest_worker.leases import Claim
from cairn_ingest_worker.retry import EffectiveRetryPolicy, decide
from cairn_ingest_worker.runner import Outcome

REQUEST = RunShard(job_id="job", shard_key="job/0")


def claim(attempts: int = 1) -> Claim:
    return Claim(shard={"shard_key": "job/0", "job_id": "job", "attempts": attempts}, token=1, cursor=0)


def test_a_finished_run_is_announced_and_counted() -> None:
    assert after_run(Outcome("succeeded", claim(), 40)) == Ack("succeeded", Announce("job", "job/0", "succeeded", 40), counted=True)
    assert after_run(Outcome("cancelled", claim(), 7)) == Ack("cancelled", Announce("job", "job/0", "cancelled", 7), counted=True)


def test_a_lost_lease_ends_the_task_silently_and_a_slice_over_resends_it_at_once() -> None:
    assert after_run(Outcome("lease_lost", claim(), 3)) == Ack("lease_lost", counted=True)
    assert after_run(Outcome("sliced", claim(), 3)) == SLICE_OVER == RetryLater(0.0)


def test_a_shard_started_too_often_is_dead_lettered_as_poison() -> None:
    decision = after_run(Outcome("poison", claim(attempts=4)))
    assert isinstance(decision, DeadLetter) and decision.reason == "poison"
    assert str(decision.error) == "shard was started 3 times without finishing"


def test_a_run_that_claimed_nothing_needs_the_stored_shard() -> None:
    with pytest.raises(ValueError):
        after_run(Outcome("not_claimable"))


@pytest.mark.parametrize(
    ("shard", "expected"),
    [
        ({"state": ShardState.SUCCEEDED}, Ack("already_done", Announce("job", "job/0", "succeeded"))),
        (
            {"state": ShardState.FAILED, "last_error": "boom"},
            Ack("already_failed", Announce("job", "job/0", "failed", error="boom")),
        ),
        ({"state": ShardState.CANCELLED}, Ack("cancelled", Announce("job", "job/0", "cancelled"))),
        ({"state": ShardState.RUNNING, "cancel_requested": True}, Ack("cancelled")),
        ({"state": ShardState.RUNNING, "taken_by": "w/1"}, Ack("held_elsewhere")),
    ],
)
def test_an_unclaimable_shard_is_announced_again_when_finished_and_otherwise_left_alone(shard, expected) -> None:
    assert for_unclaimable(REQUEST, shard) == expected


def test_a_task_naming_an_unrecorded_shard_is_dead_lettered() -> None:
    decision = for_unclaimable(REQUEST, None)
    assert isinstance(decision, DeadLetter) and decision.reason == "unknown_shard"
    assert isinstance(decision.error, LookupError) and "job/0" in str(decision.error)


def test_a_frontier_runner_of_an_unrecorded_job_is_dead_lettered_and_a_known_one_drained() -> None:
    lane = RunFrontier(job_id="gone", lane=0)
    assert for_empty_lane(lane, job_recorded=True) == Ack("drained")
    decision = for_empty_lane(lane, job_recorded=False)
    assert isinstance(decision, DeadLetter) and decision.reason == "unknown_shard"
    assert isinstance(decision.error, LookupError) and "gone" in str(decision.error)


def test_a_failure_with_attempts_left_waits_in_the_store_and_the_last_one_is_dead_lettered() -> None:
    policy = EffectiveRetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=10.0)
    error = RetryableError("flaky")
    retry = decide(error, 1, policy, rng=random.Random(1))
    assert after_failure(retry, error) == ScheduleRetry(retry, error)
    exhausted = after_failure(decide(error, 3, policy), error)
    assert isinstance(exhausted, DeadLetter) and exhausted.reason == "retries_exhausted" and exhausted.error is error
    permanent = NonRetryableError("bad source")
    assert after_failure(decide(permanent, 1, policy), permanent) == DeadLetter("non_retryable", permanent)


@pytest.mark.parametrize("handed_off", [True, None])
def test_a_store_outage_resends_the_task_after_a_capped_backoff(handed_off) -> None:
    decision = after_store_outage(handed_off, retries=5, base_s=0.5, max_s=2.0, rng=random.Random(3))
    assert isinstance(decision, RetryLater) and 0 <= decision.delay_s <= 2.0
    first = after_store_outage(handed_off, retries=0, base_s=0.5, max_s=2.0, rng=random.Random(3))
    assert isinstance(first, RetryLater) and first.delay_s <= 0.5  # the first retry's ceiling is the base


def test_a_store_outage_during_which_the_shard_was_taken_over_ends_the_task() -> None:
    assert after_store_outage(False, retries=0, base_s=0.5, max_s=2.0) == Ack("lease_lost")
