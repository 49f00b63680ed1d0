"""The Celery tasks: decode the payload, run shards, turn outcomes into ack/retry/dead letter.

- `run_shard` (range and hash-mod sharding): runs the one shard its message names.
- `run_frontier` (lease-frontier sharding): pulls the job's work items one at a time by lease
  until none is claimable.

Attempts are counted in the shard document at claim time (before any work), not by Celery, so a
shard whose runs keep killing their worker is recognised as poison and dead-lettered. A task runs
for at most `CAIRN_TASK_SLICE_S`, then hands its lease off and re-sends itself, so no delivery
stays unacknowledged long enough to reach RabbitMQ's consumer_timeout. For the same reason a
retry is not held by the worker (no ETA task): the shard waits in MongoDB (`RETRY`,
`next_retry_at_ms`), the delivery is acked, and the scheduler sends the task when it is due.
"""

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from pydantic import ValidationError
from pymongo.errors import ConnectionFailure

from cairn_contracts.messages import OriginalMessage, RunFrontier, RunShard, ShardFinished
from cairn_contracts.states import ShardState
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_contracts.topology import (
    EXCHANGE_EVENTS,
    QUEUE_INGEST,
    ROUTING_SHARD_CANCELLED,
    ROUTING_SHARD_FAILED,
    ROUTING_SHARD_SUCCEEDED,
)
from cairn_ingest_worker import metrics
from cairn_ingest_worker.consumer import stable_dead_letter_id
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.errors import StoreUnavailable
from cairn_ingest_worker.retry import JobRetryRules, RetryDefaults, decide, retry_fields, rules_for_job
from cairn_ingest_worker.leases import Claim
from cairn_ingest_worker.observability import current_pipeline
from cairn_ingest_worker.runner import Outcome, ShardFailed, backoff_delay, retry_time, run_claimed, run_shard
from cairn_runtime.amqp import dead_letter_for
from cairn_runtime.tracing import trace_carrier

logger = logging.getLogger(__name__)

SERVICE = "ingest-worker"


def register_tasks(app: Celery, context: Callable[[], WorkerContext]) -> None:
    @app.task(name=TASK_RUN_SHARD, bind=True, max_retries=None, shared=False)  # this app only (tests build several)
    def run_shard_task(self: Task, **payload: Any) -> str:
        ctx = context()
        try:
            request = RunShard.model_validate(payload)
        except ValidationError as error:
            _dead_letter_invalid(ctx, self, payload, error)
            return "contract_violation"
        try:
            max_attempts = _rules(ctx, request.job_id).policy.max_attempts
            outcome = run_shard(ctx.runner, request, max_attempts=max_attempts)
        except (StoreUnavailable, ConnectionFailure) as error:
            return _retry_after_store_outage(ctx, self, _outage(error))
        except ShardFailed as failure:
            if _handle_failure(ctx, self, failure) is not None:
                # The retry waits in MongoDB (RETRY, next_retry_at_ms); the scheduler sends its task
                # when it is due. This delivery is acked now: a worker holding it for the backoff
                # would pass RabbitMQ's consumer_timeout.
                return "retry_scheduled"
            return "failed"
        if outcome.kind == "not_claimable":
            return _not_claimable(ctx, self, request)
        if outcome.kind == "sliced":
            logger.info("shard %s: slice over after %d records; continuing in a new task", request.shard_key, outcome.records)
            raise self.retry(countdown=0, priority=_priority(self))
        return _conclude(ctx, self, outcome)

    @app.task(name=TASK_RUN_FRONTIER, bind=True, max_retries=None, shared=False)
    def run_frontier_task(self: Task, **payload: Any) -> str:
        ctx = context()
        try:
            request = RunFrontier.model_validate(payload)
        except ValidationError as error:
            _dead_letter_invalid(ctx, self, payload, error)
            return "contract_violation"
        deadline = time.monotonic() + ctx.runner.slice_s
        while (claim := _claim_next_or_retry(ctx, self, request)) is not None:
            try:
                max_attempts = _rules(ctx, request.job_id).policy.max_attempts
                outcome = run_claimed(ctx.runner, claim, max_attempts=max_attempts, deadline=deadline)
            except (StoreUnavailable, ConnectionFailure) as error:
                # The lane keeps its delivery: the item is handed back, the runner re-sent.
                return _retry_after_store_outage(ctx, self, _outage(error, claim))
            except ShardFailed as failure:
                _handle_failure(ctx, self, failure)  # a retry waits in the item (RETRY, next_retry_at_ms)
                continue
            if outcome.kind == "sliced":
                raise self.retry(countdown=0, priority=_priority(self))
            _conclude(ctx, self, outcome)
            if time.monotonic() >= deadline:
                raise self.retry(countdown=0, priority=_priority(self))
        # Items left waiting for their retry time are sent a runner by the scheduler when due:
        # this lane ends rather than hold its delivery for the backoff.
        return "drained"


def _conclude(ctx: WorkerContext, task: Task, outcome: Outcome) -> str:
    claim = outcome.claim
    assert claim is not None
    if outcome.kind == "succeeded":
        _announce(ctx, claim.shard["job_id"], claim.shard_key, "succeeded", outcome.records)
        metrics.SHARD_OUTCOMES.labels(current_pipeline(), "succeeded").inc()
        return "succeeded"
    if outcome.kind == "cancelled":
        _announce(ctx, claim.shard["job_id"], claim.shard_key, "cancelled", outcome.records)
        metrics.SHARD_OUTCOMES.labels(current_pipeline(), "cancelled").inc()
        return "cancelled"
    if outcome.kind == "poison":
        error = RuntimeError(f"shard was started {claim.attempt - 1} times without finishing")
        _dead_letter_shard(ctx, task, claim, error, reason="poison")
        return "poison"
    metrics.SHARD_OUTCOMES.labels(current_pipeline(), "lease_lost").inc()
    logger.warning("shard %s: lease lost; the worker that holds it now carries on", claim.shard_key)
    return "lease_lost"


def _handle_failure(ctx: WorkerContext, task: Task, failure: ShardFailed) -> float | None:
    """Schedule a retry (returns its delay; the scheduler sends the task when it is due) or
    dead-letter the shard (returns None)."""
    claim, error = failure.claim, failure.error
    rules = _rules(ctx, claim.shard["job_id"])
    decision = decide(error, claim.attempt, rules.policy, rules.declared)
    metrics.FAILURES.labels(failure.pipeline, type(error).__name__, str(decision.retryable).lower()).inc()
    if decision.retry:
        delay = decision.delay_s
        retry = retry_fields(claim.shard, decision.record(_describe(error)))
        # The scheduler sends the retry later: it continues this attempt's trace from the shard.
        retry["retry_trace_context"] = trace_carrier()
        if not ctx.runner.leases.schedule_retry(claim, _describe(error), retry_time(delay), extra=retry):
            return None  # another worker holds the shard now; it decides
        logger.warning(
            "shard %s attempt %d/%d failed (%s); retry in %.2f s (ceiling %.2f s), sent by the scheduler when due",
            claim.shard_key, claim.attempt, decision.max_attempts, error, delay, decision.ceiling_s,
        )
        metrics.RETRIES.labels(failure.pipeline).inc()
        return delay
    _dead_letter_shard(ctx, task, claim, error, reason=decision.dead_letter_reason)
    return None


def _rules(ctx: WorkerContext, job_id: str) -> JobRetryRules:
    """The job's retry policy (job spec → pipeline default → worker settings) and error declarations."""
    settings = ctx.settings
    defaults = RetryDefaults(settings.max_attempts, settings.retry_base_delay_s, settings.retry_max_delay_s)
    return rules_for_job(ctx.runner.jobs, job_id, defaults)


def _dead_letter_shard(ctx: WorkerContext, task: Task, claim: Claim, error: BaseException, *, reason: str) -> None:
    job_id = claim.shard["job_id"]
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason=reason,  # type: ignore[arg-type]
        error=error,
        original=_original(task, dict(task.request.kwargs or {})),
        job_id=job_id,
        shard_key=claim.shard_key,
        attempts=claim.attempt,
    )
    if not ctx.runner.leases.fail(claim, _describe(error), dead_letter.dead_letter_id):
        return  # another worker holds the shard now; it decides
    ctx.publisher.publish_dead_letter(dead_letter)
    ctx.runner.shards.update_one({"task_key": claim.shard_key}, {"$set": {"dead_lettered_at": datetime.now(UTC)}})
    logger.error("shard %s dead-lettered (%s): %s", claim.shard_key, reason, error)
    metrics.SHARD_OUTCOMES.labels(current_pipeline(), "dead_lettered").inc()
    _announce(ctx, job_id, claim.shard_key, "failed", 0, error=_describe(error))


def _outage(error: BaseException, claim: Claim | None = None) -> StoreUnavailable:
    """A store error outside a batch (claim, job lookup, lease writes) as the outage it is handled as."""
    return error if isinstance(error, StoreUnavailable) else StoreUnavailable(error, claim)


def _claim_next_or_retry(ctx: WorkerContext, task: Task, request: RunFrontier) -> Claim | None:
    """The lane's next item; while MongoDB is unreachable, the runner is re-sent (Retry raised)."""
    while True:
        try:
            return ctx.runner.leases.claim_next(request.job_id)
        except (StoreUnavailable, ConnectionFailure) as error:
            # Raises Retry; returns only if the half-claimed item was taken over meanwhile.
            _retry_after_store_outage(ctx, task, _outage(error))


def _retry_after_store_outage(ctx: WorkerContext, task: Task, outage: StoreUnavailable) -> str:
    """Keep the delivery while MongoDB is unreachable: hand back the lease this run held (once the
    store answers, within one lease TTL: past it the lease has expired anyway), then re-send the
    task after a short capped backoff (Celery's retry: published with confirms before the ack).
    No attempt is spent: the hand-off gives the claim's attempt back. Raises Celery's Retry, or
    returns "lease_lost" if another worker took the shard over meanwhile."""
    claim = outage.claim
    if isinstance(claim, Claim):
        handed_off = _hand_off_when_store_answers(ctx, claim)
        if handed_off is False:
            logger.warning("shard %s: taken over while MongoDB was unreachable; this task ends", claim.shard_key)
            return "lease_lost"
    settings = ctx.settings
    delay = backoff_delay(task.request.retries + 1, settings.store_retry_base_s, settings.store_retry_max_s)
    logger.warning("MongoDB unreachable (%s); task %s retried in %.2f s", outage.error, task.request.id, delay)
    raise task.retry(countdown=delay, max_retries=None, priority=_priority(task))


def _hand_off_when_store_answers(ctx: WorkerContext, claim: Claim) -> bool | None:
    """True: handed off; False: another worker holds the shard now; None: the store stayed away
    for a whole lease TTL (the lease has expired by now: any claim may take the shard)."""
    deadline = time.monotonic() + ctx.settings.lease_ttl_s
    pause = ctx.settings.store_retry_base_s
    while True:
        try:
            return ctx.runner.leases.hand_off(claim)
        except ConnectionFailure:
            pass  # still away
        if time.monotonic() + pause > deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, ctx.settings.store_retry_max_s)


def _not_claimable(ctx: WorkerContext, task: Task, request: RunShard) -> str:
    shard = ctx.runner.shards.find_one({"task_key": request.shard_key})
    if shard is None:
        _dead_letter_unknown_shard(ctx, task, request)
        return "unknown_shard"
    if shard["state"] == ShardState.SUCCEEDED:
        _announce(ctx, request.job_id, request.shard_key, "succeeded", 0)  # the first may have been lost
        return "already_done"
    if shard["state"] == ShardState.FAILED:
        _announce(ctx, request.job_id, request.shard_key, "failed", 0, error=shard.get("last_error"))
        return "already_failed"
    if shard["state"] == ShardState.CANCELLED or shard.get("cancel_requested"):
        if shard["state"] == ShardState.CANCELLED:
            _announce(ctx, request.job_id, request.shard_key, "cancelled", 0)  # the first may have been lost
        logger.info("shard %s belongs to a cancelled job; its task ends", request.shard_key)
        return "cancelled"
    # A live lease elsewhere (a duplicate delivery, or a holder that will stop renewing if it
    # died: the scheduler's reaper then returns the shard to ready and dispatches it again).
    logger.info("shard %s is held by %s; this duplicate task ends", request.shard_key, shard.get("taken_by"))
    return "held_elsewhere"


def _dead_letter_invalid(ctx: WorkerContext, task: Task, payload: dict, error: ValidationError) -> None:
    original = _original(task, payload)
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="contract_violation",
        error=error,
        original=original,
        dead_letter_id=stable_dead_letter_id(original),  # a redelivery is recorded once
    )
    ctx.publisher.publish_dead_letter(dead_letter)
    logger.error("task %s dead-lettered: payload is not a valid %s", task.request.id, task.name)


def _dead_letter_unknown_shard(ctx: WorkerContext, task: Task, request: RunShard) -> None:
    """A task naming a shard that is not recorded: kept in the DLQ (one entry however often the
    task is delivered), not only logged."""
    original = _original(task, request.model_dump())
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="unknown_shard",
        error=LookupError(f"shard {request.shard_key} of job {request.job_id} is not recorded"),
        original=original,
        job_id=request.job_id,
        shard_key=request.shard_key,
        dead_letter_id=stable_dead_letter_id(original, "unknown_shard"),
    )
    ctx.publisher.publish_dead_letter(dead_letter)
    logger.error("shard %s is not recorded; its task is dead-lettered", request.shard_key)


def _announce(ctx: WorkerContext, job_id: str, shard_key: str, outcome: str, records: int, error: str | None = None) -> None:
    event = ShardFinished(job_id=job_id, shard_key=shard_key, outcome=outcome, records_done=records, error=error)  # type: ignore[arg-type]
    routing_key = {"succeeded": ROUTING_SHARD_SUCCEEDED, "cancelled": ROUTING_SHARD_CANCELLED}.get(outcome, ROUTING_SHARD_FAILED)
    ctx.publisher.publish(EXCHANGE_EVENTS, routing_key, event)


def _original(task: Task, payload: dict) -> OriginalMessage:
    return OriginalMessage(
        body=json.dumps({"task": task.name, "id": task.request.id, "kwargs": payload}, default=str),
        headers={"task": task.name, "id": task.request.id},
        routing_key=(task.request.delivery_info or {}).get("routing_key"),
    )


def _priority(task: Task) -> int | None:
    return (task.request.delivery_info or {}).get("priority")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]
