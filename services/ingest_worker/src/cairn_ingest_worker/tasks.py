"""The Celery task: decode the payload, run the shard, turn the outcome into ack/retry/dead letter.

Attempts are counted in the shard document at claim time (before any work), not by Celery, so a
shard whose runs keep killing their worker is recognised as poison and dead-lettered.
"""

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from pydantic import ValidationError

from cairn_contracts.messages import OriginalMessage, RunShard, ShardFinished
from cairn_contracts.states import ShardState
from cairn_contracts.tasks import TASK_RUN_SHARD
from cairn_contracts.topology import EXCHANGE_EVENTS, QUEUE_INGEST, ROUTING_SHARD_FAILED, ROUTING_SHARD_SUCCEEDED
from cairn_ingest_worker import metrics
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.errors import is_retryable
from cairn_ingest_worker.leases import Claim
from cairn_ingest_worker.runner import ShardFailed, backoff_delay, retry_time, run_shard
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
            outcome = run_shard(ctx.runner, request, max_attempts=ctx.settings.max_attempts)
        except ShardFailed as failure:
            return _handle_failure(ctx, self, request, failure)
        if outcome.kind == "succeeded":
            _announce(ctx, request, "succeeded", outcome.records)
            metrics.SHARD_OUTCOMES.labels("any", "succeeded").inc()
            return "succeeded"
        if outcome.kind == "poison":
            error = RuntimeError(f"shard was started {outcome.claim.attempt - 1} times without finishing")
            _dead_letter_shard(ctx, self, request, outcome.claim, error, reason="poison")
            return "poison"
        if outcome.kind == "not_claimable":
            return _not_claimable(ctx, self, request)
        metrics.SHARD_OUTCOMES.labels("any", "lease_lost").inc()
        logger.warning("shard %s: lease lost; the worker that holds it now carries on", request.shard_key)
        return "lease_lost"


def _handle_failure(ctx: WorkerContext, task: Task, request: RunShard, failure: ShardFailed) -> str:
    claim, error = failure.claim, failure.error
    retryable = is_retryable(error)
    metrics.FAILURES.labels(failure.pipeline, type(error).__name__, str(retryable).lower()).inc()
    if retryable and claim.attempt < ctx.settings.max_attempts:
        delay = backoff_delay(claim.attempt, ctx.settings.retry_base_delay_s, ctx.settings.retry_max_delay_s)
        if ctx.runner.leases.schedule_retry(claim, _describe(error), retry_time(delay)):
            logger.warning("shard %s attempt %d failed (%s); retry in %.1f s", claim.shard_key, claim.attempt, error, delay)
            raise task.retry(countdown=delay, priority=_priority(task))
        return "lease_lost"
    reason = "retries_exhausted" if retryable else "non_retryable"
    _dead_letter_shard(ctx, task, request, claim, error, reason=reason)
    return reason


def _dead_letter_shard(ctx: WorkerContext, task: Task, request: RunShard, claim: Claim, error: BaseException, *, reason: str) -> None:
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason=reason,  # type: ignore[arg-type]
        error=error,
        original=_original(task, request.model_dump()),
        job_id=request.job_id,
        shard_key=request.shard_key,
        attempts=claim.attempt,
    )
    if not ctx.runner.leases.fail(claim, _describe(error), dead_letter.dead_letter_id):
        return  # another worker holds the shard now; it decides
    ctx.publisher.publish_dead_letter(dead_letter)
    ctx.runner.shards.update_one({"task_key": claim.shard_key}, {"$set": {"dead_lettered_at": datetime.now(UTC)}})
    logger.error("shard %s dead-lettered (%s): %s", claim.shard_key, reason, error)
    metrics.SHARD_OUTCOMES.labels("any", "dead_lettered").inc()
    _announce(ctx, request, "failed", 0, error=_describe(error))


def _not_claimable(ctx: WorkerContext, task: Task, request: RunShard) -> str:
    shard = ctx.runner.shards.find_one({"task_key": request.shard_key})
    if shard is None:
        logger.error("shard %s is not recorded; dropping its task", request.shard_key)
        return "unknown_shard"
    state = shard["state"]
    if state == ShardState.SUCCEEDED:
        _announce(ctx, request, "succeeded", 0)  # repeat: the first announcement may have been lost
        return "already_done"
    if state == ShardState.FAILED:
        _announce(ctx, request, "failed", 0, error=shard.get("last_error"))
        return "already_failed"
    # Another worker's lease is live (a duplicate delivery, or the holder crashed): come back
    # when that lease would have expired, and take over if nobody renewed it.
    delay = ctx.settings.lease_ttl_s + 1
    raise task.retry(countdown=delay, priority=_priority(task))


def _dead_letter_invalid(ctx: WorkerContext, task: Task, payload: dict, error: ValidationError) -> None:
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="contract_violation",
        error=error,
        original=_original(task, payload),
    )
    ctx.publisher.publish_dead_letter(dead_letter)
    logger.error("task %s dead-lettered: payload is not a valid RunShard", task.request.id)


def _announce(ctx: WorkerContext, request: RunShard, outcome: str, records: int, error: str | None = None) -> None:
    event = ShardFinished(job_id=request.job_id, shard_key=request.shard_key, outcome=outcome, records_done=records, error=error)  # type: ignore[arg-type]
    routing_key = ROUTING_SHARD_SUCCEEDED if outcome == "succeeded" else ROUTING_SHARD_FAILED
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

