"""The Celery tasks: decode the payload, run shards, turn outcomes into ack/retry/dead letter.

- `run_shard` (range and hash-mod sharding): runs the one shard its message names.
- `run_frontier` (lease-frontier sharding): pulls the job's work items one at a time by lease
  until none is claimable.

Attempts are counted in the shard document at claim time (before any work), not by Celery, so a
shard whose runs keep killing their worker is recognised as poison and dead-lettered. A task runs
for at most `CAIRN_TASK_SLICE_S`, then hands its lease off and re-sends itself, so no delivery
stays unacknowledged long enough to reach RabbitMQ's consumer_timeout.
"""

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from pydantic import ValidationError

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
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.retry import JobRetryRules, RetryDefaults, decide, retry_fields, rules_for_job
from cairn_ingest_worker.leases import Claim, epoch_ms
from cairn_ingest_worker.observability import current_pipeline
from cairn_ingest_worker.runner import Outcome, ShardFailed, retry_time, run_claimed, run_shard
from cairn_runtime.amqp import dead_letter_for

logger = logging.getLogger(__name__)

SERVICE = "ingest-worker"


def register_tasks(app: Celery, context: Callable[[], WorkerContext]) -> None:
    @app.task(name=TASK_RUN_SHARD, bind=True, max_retries=None)
    def run_shard_task(self: Task, **payload: Any) -> str:
        ctx = context()
        try:
            request = RunShard.model_validate(payload)
        except ValidationError as error:
            _dead_letter_invalid(ctx, self, payload, error)
            return "contract_violation"
        try:
            outcome = run_shard(ctx.runner, request, max_attempts=_rules(ctx, request.job_id).policy.max_attempts)
        except ShardFailed as failure:
            delay = _handle_failure(ctx, self, failure)
            if delay is not None:
                raise self.retry(countdown=delay, priority=_priority(self))
            return "failed"
        if outcome.kind == "not_claimable":
            return _not_claimable(ctx, request)
        if outcome.kind == "sliced":
            logger.info("shard %s: slice over after %d records; continuing in a new task", request.shard_key, outcome.records)
            raise self.retry(countdown=0, priority=_priority(self))
        return _conclude(ctx, self, outcome)

    @app.task(name=TASK_RUN_FRONTIER, bind=True, max_retries=None)
    def run_frontier_task(self: Task, **payload: Any) -> str:
        ctx = context()
        try:
            request = RunFrontier.model_validate(payload)
        except ValidationError as error:
            _dead_letter_invalid(ctx, self, payload, error)
            return "contract_violation"
        deadline = time.monotonic() + ctx.runner.slice_s
        leases = ctx.runner.leases
        while (claim := leases.claim_next(request.job_id)) is not None:
            try:
                max_attempts = _rules(ctx, request.job_id).policy.max_attempts
                outcome = run_claimed(ctx.runner, claim, max_attempts=max_attempts, deadline=deadline)
            except ShardFailed as failure:
                _handle_failure(ctx, self, failure)  # a retry waits in the item (RETRY, next_retry_at_ms)
                continue
            if outcome.kind == "sliced":
                raise self.retry(countdown=0, priority=_priority(self))
            _conclude(ctx, self, outcome)
            if time.monotonic() >= deadline:
                raise self.retry(countdown=0, priority=_priority(self))
        next_due_ms = _next_retry_due_ms(ctx, request.job_id)
        if next_due_ms is not None:
            # Only items waiting for their retry time are left: this lane comes back for them.
            raise self.retry(countdown=max(0.05, (next_due_ms - epoch_ms()) / 1000), priority=_priority(self))
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
    """Schedule a retry (returns its delay) or dead-letter the shard (returns None)."""
    claim, error = failure.claim, failure.error
    rules = _rules(ctx, claim.shard["job_id"])
    decision = decide(error, claim.attempt, rules.policy, rules.declared)
    metrics.FAILURES.labels(failure.pipeline, type(error).__name__, str(decision.retryable).lower()).inc()
    if decision.retry:
        delay = decision.delay_s
        retry = retry_fields(claim.shard, decision.record(_describe(error)))
        if not ctx.runner.leases.schedule_retry(claim, _describe(error), retry_time(delay), extra=retry):
            return None  # another worker holds the shard now; it decides
        logger.warning(
            "shard %s attempt %d/%d failed (%s); retry in %.2f s (ceiling %.2f s)",
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


def _not_claimable(ctx: WorkerContext, request: RunShard) -> str:
    shard = ctx.runner.shards.find_one({"task_key": request.shard_key})
    if shard is None:
        logger.error("shard %s is not recorded; dropping its task", request.shard_key)
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


def _next_retry_due_ms(ctx: WorkerContext, job_id: str) -> int | None:
    waiting = ctx.runner.shards.find_one(
        {"job_id": job_id, "state": ShardState.RETRY}, {"next_retry_at_ms": 1}, sort=[("next_retry_at_ms", 1)]
    )
    return int(waiting["next_retry_at_ms"]) if waiting else None


def _dead_letter_invalid(ctx: WorkerContext, task: Task, payload: dict, error: ValidationError) -> None:
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="contract_violation",
        error=error,
        original=_original(task, payload),
    )
    ctx.publisher.publish_dead_letter(dead_letter)
    logger.error("task %s dead-lettered: payload is not a valid %s", task.request.id, task.name)


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
