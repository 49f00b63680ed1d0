"""What the worker does once a shard run has ended: plain functions from what happened to a decision.

A decision is one of four small values; `tasks.py` carries it out (publishes, writes the shard,
raises Celery's Retry). Deciding is kept apart from doing so that every case (announce, retry or
dead-letter, a task whose shard is not claimable, a store outage, a slice hand-off) is unit-tested
without Celery, RabbitMQ or MongoDB (tests/test_worker_decisions.py).

- `Ack(outcome, announce)`: the task ends (its delivery is acked) with result `outcome`, after
  publishing `announce` (a ShardFinished) if set.
- `RetryLater(delay_s)`: the task is re-sent after `delay_s` seconds (Celery's retry, published
  with confirms before the delivery is acked): a slice hand-off (0 s) or a store outage.
- `ScheduleRetry(retry, error)`: the failed shard waits in MongoDB (RETRY, next_retry_at_ms) and the
  scheduler sends its task when due; this delivery is acked.
- `DeadLetter(reason, error)`: the shard (or the task) goes to the DLQ.
"""

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.states import ShardState
from cairn_ingest_worker.retry import RetryDecision
from cairn_ingest_worker.runner import Outcome, backoff_delay

logger = logging.getLogger(__name__)

ShardOutcome = Literal["succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class Announce:
    """A ShardFinished event to publish: how the shard ended, records done (count), error text."""

    job_id: str
    shard_key: str
    outcome: ShardOutcome
    records: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Ack:
    """End the task with result `outcome`; `counted`: a shard outcome of this run (SHARD_OUTCOMES)."""

    outcome: str
    announce: Announce | None = None
    counted: bool = False


@dataclass(frozen=True)
class RetryLater:
    """Re-send this task after `delay_s` seconds (Celery's retry)."""

    delay_s: float


@dataclass(frozen=True)
class ScheduleRetry:
    """Park the failed shard in RETRY for `retry.delay_s` seconds; the scheduler sends its task."""

    retry: RetryDecision
    error: BaseException


@dataclass(frozen=True)
class DeadLetter:
    """Dead-letter the claimed shard, or the task itself (`contract_violation`, `unknown_shard`)."""

    reason: Literal["poison", "retries_exhausted", "non_retryable", "contract_violation", "unknown_shard"]
    error: BaseException


Decision = Ack | RetryLater | ScheduleRetry | DeadLetter

SLICE_OVER = RetryLater(0.0)  # the slice's time is up: its lease was handed off, a new task continues


def after_run(outcome: Outcome) -> Decision:
    """The decision for a run that ended without raising; `not_claimable` is `for_unclaimable`'s.

    Raises ValueError for `not_claimable` (the shard must be read first)."""
    if outcome.kind == "sliced":
        return SLICE_OVER
    if outcome.kind == "not_claimable" or outcome.claim is None:
        raise ValueError("a run that claimed nothing is decided by for_unclaimable")
    claim = outcome.claim
    job_id = claim.shard["job_id"]
    if outcome.kind == "succeeded":
        return Ack("succeeded", Announce(job_id, claim.shard_key, "succeeded", outcome.records), counted=True)
    if outcome.kind == "cancelled":
        return Ack("cancelled", Announce(job_id, claim.shard_key, "cancelled", outcome.records), counted=True)
    if outcome.kind == "poison":
        # The attempt was counted at claim time: the previous ones all ended without an outcome.
        return DeadLetter("poison", RuntimeError(f"shard was started {claim.attempt - 1} times without finishing"))
    return Ack("lease_lost", counted=True)  # the worker that holds the lease now carries on


def for_unclaimable(request: RunShard, shard: Mapping[str, Any] | None) -> Ack | DeadLetter:
    """The decision for a task whose shard could not be claimed, given the shard as stored (or None)."""
    if shard is None:
        # Kept in the DLQ (one entry however often the task is delivered), not only logged.
        return DeadLetter("unknown_shard", LookupError(f"shard {request.shard_key} of job {request.job_id} is not recorded"))
    state = shard["state"]
    if state == ShardState.SUCCEEDED:  # announced again: the first event may have been lost
        return Ack("already_done", Announce(request.job_id, request.shard_key, "succeeded"))
    if state == ShardState.FAILED:
        return Ack("already_failed", Announce(request.job_id, request.shard_key, "failed", error=shard.get("last_error")))
    if state == ShardState.CANCELLED:
        return Ack("cancelled", Announce(request.job_id, request.shard_key, "cancelled"))
    if shard.get("cancel_requested"):
        logger.info("shard %s belongs to a cancelled job; its task ends", request.shard_key)
        return Ack("cancelled")
    # A live lease elsewhere (a duplicate delivery, or a holder that will stop renewing if it
    # died: the scheduler's reaper then returns the shard to ready and dispatches it again).
    logger.info("shard %s is held by %s; this duplicate task ends", request.shard_key, shard.get("taken_by"))
    return Ack("held_elsewhere")


def for_empty_lane(request: RunFrontier, job_recorded: bool) -> Ack | DeadLetter:
    """The decision for a frontier runner that found nothing to claim: its lane is drained, or,
    when neither the job nor any of its items is recorded, the task names an unknown job and is
    kept in the DLQ (one entry however often it is delivered), as an unknown shard's task is."""
    if job_recorded:
        return Ack("drained")
    return DeadLetter("unknown_shard", LookupError(f"lease-frontier job {request.job_id} is not recorded"))


def after_failure(retry: RetryDecision, error: BaseException) -> ScheduleRetry | DeadLetter:
    """A failed attempt (the pipeline raised `error`, classified by `retry.decide`): wait or give up."""
    if retry.retry:
        return ScheduleRetry(retry, error)
    return DeadLetter(retry.dead_letter_reason, error)  # type: ignore[arg-type]


def after_store_outage(
    handed_off: bool | None, retries: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> Ack | RetryLater:
    """MongoDB was unreachable during the task: re-send it after a capped full-jitter backoff.

    `handed_off`: what handing the lease back gave (True; None when nothing was held or the store
    stayed away a whole lease TTL); False means another worker took the shard over meanwhile, so
    this task ends. `retries`: Celery's count of this task's retries so far (0 the first time);
    `base_s`/`max_s`: the backoff in seconds."""
    if handed_off is False:
        return Ack("lease_lost")
    return RetryLater(backoff_delay(retries + 1, base_s, max_s, rng))
