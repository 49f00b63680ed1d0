"""The Celery tasks: decode the payload, run shards, carry out what `decisions.py` decides.

- `run_shard` (range and hash-mod sharding): runs the one shard its message names.
- `run_shards` (a bundle of small range or hash-mod shards, scheduler/bundles.py): claims the
  waiting ones in bulk and runs them one after another, each ending as it would alone.
- `run_frontier` (lease-frontier sharding): pulls the job's work items by lease, a block from
  the job's counter at a time (run as a bundle is), then one by one what is claimable again,
  until none is.

Attempts are counted in the shard document when a shard's run starts (at claim time; for a
bundle's bulk claim, when its turn comes), before any work, not by Celery, so a shard whose runs
keep killing their worker is recognised as poison and dead-lettered. A task runs
for at most `CAIRN_TASK_SLICE_S`, then hands its lease off and re-sends itself, so no delivery
stays unacknowledged long enough to reach RabbitMQ's consumer_timeout. For the same reason a
retry is not held by the worker (no ETA task): the shard waits in MongoDB (`RETRY`,
`next_retry_at_ms`), the delivery is acked, and the scheduler sends the task when it is due.

What to do once a run ends is decided by the plain functions of `decisions.py`; `_carry_out` is
the one place that does it (publish, write the shard, raise Celery's Retry).
"""

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.exceptions import Retry
from pydantic import ValidationError
from pymongo.errors import ConnectionFailure

from cairn_contracts import clock
from cairn_contracts.messages import MAX_BUNDLE_SHARDS, OriginalMessage, RunFrontier, RunShard, RunShards, ShardFinished
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD, TASK_RUN_SHARDS
from cairn_contracts.topology import QUEUE_INGEST
from cairn_ingest_worker import metrics
from cairn_ingest_worker.consumer import stable_dead_letter_id
from cairn_ingest_worker.context import WorkerContext, WorkerTask
from cairn_ingest_worker.decisions import (
    SLICE_OVER,
    Ack,
    Announce,
    DeadLetter,
    Decision,
    RetryLater,
    ScheduleRetry,
    after_failure,
    after_run,
    after_store_outage,
    for_empty_lane,
    for_unclaimable,
)
from cairn_ingest_worker.errors import StoreUnavailable
from cairn_ingest_worker.leases import FRONTIER_BLOCK, Claim, HeldLeases
from cairn_ingest_worker.observability import current_pipeline
from cairn_ingest_worker.retry import JobRetryRules, RetryDefaults, decide, retry_fields, rules_for_job
from cairn_ingest_worker.runner import BundleRun, ShardFailed, retry_time, run_claimed, run_in_one_batch, run_shard
from cairn_runtime.amqp import dead_letter_for
from cairn_runtime.tracing import trace_carrier

logger = logging.getLogger(__name__)

SERVICE = "ingest-worker"


def register_tasks(app: Celery, build_context: Callable[[], WorkerContext]) -> None:
    """Register `run_shard` and `run_frontier` on `app`; each pool process builds its context once
    with `build_context` (cached on the task: `WorkerTask.context`)."""
    options: dict[str, Any] = {
        "base": WorkerTask,
        "build_context": staticmethod(build_context),  # a class attribute of the task: not a method
        "bind": True,
        "max_retries": None,
        "shared": False,  # this app only (tests build several)
    }

    @app.task(name=TASK_RUN_SHARD, **options)
    def run_shard_task(self: WorkerTask, **payload: Any) -> str:
        ctx = self.context
        try:
            request = RunShard.model_validate(payload)
        except ValidationError as error:
            return _carry_out(ctx, self, DeadLetter("contract_violation", error))
        return _run_one(ctx, self, request)

    @app.task(name=TASK_RUN_SHARDS, **options)
    def run_shards_task(self: WorkerTask, **payload: Any) -> str:
        ctx = self.context
        try:
            request = RunShards.model_validate(payload)
        except ValidationError as error:
            return _carry_out(ctx, self, DeadLetter("contract_violation", error))
        return _run_bundle(ctx, self, request)

    @app.task(name=TASK_RUN_FRONTIER, **options)
    def run_frontier_task(self: WorkerTask, **payload: Any) -> str:
        ctx = self.context
        try:
            request = RunFrontier.model_validate(payload)
        except ValidationError as error:
            return _carry_out(ctx, self, DeadLetter("contract_violation", error))
        deadline = time.monotonic() + ctx.runner.slice_s
        claimed = False
        # Blocks of items from the job's counter, claimed and run together like a bundle; then
        # one by one what is claimable again past the counter (due retries, expired leases).
        size = _frontier_block_size(ctx, request.job_id)
        while keys := _take_block_or_retry(ctx, self, request, size):
            claimed = _run_frontier_block(ctx, self, request, keys, deadline) or claimed
            if time.monotonic() >= deadline:
                _carry_out(ctx, self, SLICE_OVER)
        while (claim := _claim_next_or_retry(ctx, self, request)) is not None:
            claimed = True
            try:
                max_attempts = _rules(ctx, request.job_id).policy.max_attempts
                outcome = run_claimed(ctx.runner, claim, max_attempts=max_attempts, deadline=deadline)
            except (StoreUnavailable, ConnectionFailure) as error:
                # The lane keeps its delivery: the item is handed back, the runner re-sent.
                return _carry_out(ctx, self, _after_store_outage(ctx, self, _outage(error, claim)))
            except ShardFailed as failure:
                # A retry waits in the item (RETRY, next_retry_at_ms); the lane goes on.
                _carry_out(ctx, self, _after_failure(ctx, failure), failure.claim)
                continue
            _carry_out(ctx, self, after_run(outcome), outcome.claim)  # raises Retry if sliced
            if time.monotonic() >= deadline:
                _carry_out(ctx, self, SLICE_OVER)
        # Items left waiting for their retry time are sent a runner by the scheduler when due:
        # this lane ends rather than hold its delivery for the backoff.
        if claimed:
            return "drained"
        return _carry_out(ctx, self, for_empty_lane(request, _job_recorded(ctx, request.job_id)), request=request)


def _frontier_block_size(ctx: WorkerContext, job_id: str) -> int:
    """Items a lane takes from its job's counter at a time: about one batch of records (its
    items run together, `_run_frontier_block`), at least FRONTIER_BLOCK, at most MAX_BUNDLE_SHARDS."""
    try:
        spec = (ctx.runner.job(job_id) or {}).get("spec") or {}
    except ConnectionFailure:
        return FRONTIER_BLOCK  # the block's claim meets the outage next, and re-sends the lane
    item_size = int((spec.get("sharding") or {}).get("item_size") or 0)
    per_batch = int(spec.get("batch_size") or 0) // item_size if item_size > 0 else 0
    return max(FRONTIER_BLOCK, min(MAX_BUNDLE_SHARDS, per_batch))


def _take_block_or_retry(ctx: WorkerContext, task: WorkerTask, request: RunFrontier, size: int) -> list[str]:
    """The lane's next block of item keys ([]: the counter is past the last item); while MongoDB
    is unreachable, the runner is re-sent (Retry raised)."""
    try:
        return ctx.runner.leases.take_block(request.job_id, size)
    except ConnectionFailure as error:
        _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)))  # raises Retry: nothing was held
        return []


def _run_frontier_block(ctx: WorkerContext, task: WorkerTask, request: RunFrontier, keys: list[str], deadline: float) -> bool:
    """Claim a block of a lane's items in bulk (those waiting) and run them as a bundle's shards
    are run (`_run_claims`); items not waiting are left to the scan past the counter. A store
    outage or the slice's end hands back the claims not started and re-sends the lane (Retry
    raised). Returns whether anything was claimed."""
    try:
        max_attempts = _rules(ctx, request.job_id).policy.max_attempts
        claims = ctx.runner.leases.claim_waiting(keys)
    except ConnectionFailure as error:
        _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)))  # raises Retry: nothing is held
        return False
    if not claims:
        return False
    with _holding(ctx, claims) as held:
        _run_claims(ctx, task, keys, claims, held, deadline=deadline, max_attempts=max_attempts, resend=lambda rest: None)
    return True


def _carry_out_together(ctx: WorkerContext, task: WorkerTask, together: BundleRun, held: HeldLeases, outcomes: Counter[str]) -> set[str]:
    """Carry out what `run_in_one_batch` decided for each shard it ended or could not start
    (counted in `outcomes`), their `ShardFinished` events published together at the end (one
    wait for all their confirms); returns their keys."""
    ended: set[str] = set()
    events: list[Announce] = []
    try:
        for outcome in together.outcomes:
            assert outcome.claim is not None
            held.started(outcome.claim)
            outcomes[_carry_out(ctx, task, after_run(outcome), outcome.claim, announced=events)] += 1
            ended.add(outcome.claim.shard_key)
        for failure in together.failures:
            held.started(failure.claim)
            outcomes[_carry_out(ctx, task, _after_failure(ctx, failure), failure.claim, announced=events)] += 1
            ended.add(failure.claim.shard_key)
        for claim in together.unstarted:
            held.started(claim)
            outcomes[_carry_out(ctx, task, _not_started(ctx, claim), claim, announced=events)] += 1
            ended.add(claim.shard_key)
    except BaseException:
        _announce_all(ctx, events, quietly=True)  # what ended before the error is announced still
        raise
    _announce_all(ctx, events)
    return ended


def _not_started(ctx: WorkerContext, claim: Claim) -> Ack:
    """A bundle's claim whose run could not start (`ShardLeases.start`): its job was cancelled
    (the shard ends CANCELLED here, announced), or another worker holds the shard now."""
    shard = ctx.runner.shards.find_one({"_id": claim.shard_key}, {"cancel_requested": 1, "fencing_token": 1})
    if shard and shard.get("cancel_requested") and shard.get("fencing_token") == claim.token and ctx.runner.leases.cancel(claim):
        logger.info("shard %s: its job was cancelled before its turn in the bundle", claim.shard_key)
        return Ack("cancelled", Announce(claim.shard["job_id"], claim.shard_key, "cancelled"), counted=True)
    return Ack("lease_lost", counted=True)


@contextmanager
def _holding(ctx: WorkerContext, claims: dict[str, Claim]) -> Iterator[HeldLeases]:
    """The leases of a group's claims kept alive while they wait their turn (`HeldLeases`); on
    any exit but a re-send (which hands them back itself, before sending) the claims not started
    are handed back at once, so no shard waits for its lease to expire."""
    runner = ctx.runner
    with HeldLeases(runner.leases, list(claims.values()), runner.heartbeat_interval_s, runner.batch_time_limit_s) as held:
        try:
            yield held
        except Retry:
            raise
        except BaseException:
            _hand_back(ctx, held)
            raise


def _run_claims(
    ctx: WorkerContext,
    task: WorkerTask,
    keys: list[str],
    claims: dict[str, Claim],
    held: HeldLeases,
    *,
    deadline: float,
    max_attempts: int,
    resend: Callable[[list[str]], RunShards | None],
    unclaimed: Callable[[str, RunShards | None], str] | None = None,
) -> Counter[str]:
    """Run a group of claims in `keys`' order (a bundle's, a frontier block's): those read whole
    by one batch together (`run_in_one_batch`), then every other one by `run_claimed`, each
    started first (`ShardLeases.start`: its attempt counted, a cancel noticed). A key not claimed
    goes to `unclaimed` (a bundle runs it as its own task would; None: skipped). Each shard ends
    as it would alone. A store outage or the deadline re-sends `resend(keys left)` (None: this
    task as it came) after handing back the claims not started (Retry raised). Returns the
    outcomes counted."""
    outcomes: Counter[str] = Counter()
    try:
        with held.in_batch():
            claimed = [claims[k] for k in keys if k in claims]
            together = run_in_one_batch(ctx.runner, claimed, max_attempts=max_attempts, deadline=deadline, lap=held.lap)
    except (StoreUnavailable, ConnectionFailure) as error:
        _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)), resend=resend(keys), held=held)  # raises Retry
        return outcomes
    ended = _carry_out_together(ctx, task, together, held, outcomes)
    for left in together.rest:
        held.update(left)  # started ones are handed back with their attempt given back
    try:
        # A first claim run on its own adopts its checkpoint before it (its commits are fenced on it).
        alone, lost = ctx.runner.leases.adopt_all(together.rest)
    except ConnectionFailure as error:
        _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)), resend=resend([k for k in keys if k not in ended]), held=held)
        return outcomes  # not reached: the outage re-sends (Retry raised)
    for gone in lost:  # a newer holder wrote its checkpoint: the shard is theirs
        held.started(gone)
        outcomes[_carry_out(ctx, task, Ack("lease_lost", counted=True), gone)] += 1
        ended.add(gone.shard_key)
    pending = {left.shard_key: left for left in alone}
    remaining = [key for key in keys if key not in ended]
    for position, key in enumerate(remaining):
        rest = resend(remaining[position:])
        if (position or ended) and time.monotonic() >= deadline:
            _carry_out(ctx, task, SLICE_OVER, resend=rest, held=held)  # raises Retry
        if (claim := pending.get(key)) is None:
            if unclaimed is not None:
                outcomes[unclaimed(key, rest)] += 1
            continue
        try:
            if claim.shard.get("bundle_claim"):  # not started yet
                started = ctx.runner.leases.start(claim)
                if started is None:
                    held.started(claim)
                    outcomes[_carry_out(ctx, task, _not_started(ctx, claim), claim)] += 1
                    continue
                claim = started
            held.started(claim)
            outcome = run_claimed(ctx.runner, claim, max_attempts=max_attempts, deadline=deadline)
        except (StoreUnavailable, ConnectionFailure) as error:
            # A started claim is handed back by the outage handling (its attempt given back); one
            # not started yet is still held, and handed back with the others before the re-send.
            outage = _outage(error, claim) if not claim.shard.get("bundle_claim") else _outage(error)
            outcomes[_carry_out(ctx, task, _after_store_outage(ctx, task, outage), resend=rest, held=held)] += 1
            continue
        except ShardFailed as failure:
            outcomes[_carry_out(ctx, task, _after_failure(ctx, failure), failure.claim)] += 1
            continue
        outcomes[_carry_out(ctx, task, after_run(outcome), outcome.claim, resend=rest, held=held)] += 1
    return outcomes


def _run_one(
    ctx: WorkerContext,
    task: WorkerTask,
    request: RunShard,
    *,
    resend: RunShards | None = None,
    held: HeldLeases | None = None,
    deadline: float | None = None,
) -> str:
    """Claim and run one shard, then carry out what its end decides. In a bundle: `resend`, the
    task a RetryLater re-sends (the bundle's shards from this one on) instead of this task, and
    `held`, the bundle's claims handed back before it is, and `deadline`, the bundle's."""
    try:
        max_attempts = _rules(ctx, request.job_id).policy.max_attempts
        outcome = run_shard(ctx.runner, request, max_attempts=max_attempts, deadline=deadline)
    except (StoreUnavailable, ConnectionFailure) as error:
        return _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)), resend=resend, held=held)
    except ShardFailed as failure:
        return _carry_out(ctx, task, _after_failure(ctx, failure), failure.claim)
    if outcome.kind == "not_claimable":
        shard = ctx.runner.shards.find_one({"_id": request.shard_key})
        return _carry_out(ctx, task, for_unclaimable(request, shard), request=request)
    if outcome.kind == "sliced":
        logger.info("shard %s: slice over after %d records; continuing in a new task", request.shard_key, outcome.records)
    return _carry_out(ctx, task, after_run(outcome), outcome.claim, resend=resend, held=held)


def _run_bundle(ctx: WorkerContext, task: WorkerTask, request: RunShards) -> str:
    """Run a bundle's shards (scheduler/bundles.py): the waiting ones claimed in bulk
    (`claim_waiting`; their leases kept alive while they wait their turn) and run by
    `_run_claims`, any other one as its own task would be. Each shard ends as it would alone (its
    event, retry or dead letter) and the bundle goes on; a store outage or the end of the time
    slice hands back the claims not started and re-sends the rest of the bundle. Returns the
    outcomes counted (`"3 succeeded, 1 already_done"`)."""
    deadline = time.monotonic() + ctx.runner.slice_s
    try:
        max_attempts = _rules(ctx, request.job_id).policy.max_attempts
        claims = ctx.runner.leases.claim_waiting(request.shard_keys)
    except ConnectionFailure as error:
        return _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)))  # the whole bundle again: nothing is held

    def resend(keys: list[str]) -> RunShards:
        return RunShards(job_id=request.job_id, shard_keys=keys)

    def alone(shard_key: str, rest: RunShards | None) -> str:
        single = RunShard(job_id=request.job_id, shard_key=shard_key)
        return _run_one(ctx, task, single, resend=rest, held=held, deadline=deadline)

    with _holding(ctx, claims) as held:
        outcomes = _run_claims(
            ctx, task, list(request.shard_keys), claims, held, deadline=deadline, max_attempts=max_attempts, resend=resend, unclaimed=alone
        )
    return ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))


def _hand_back(ctx: WorkerContext, held: HeldLeases) -> None:
    """Hand off the bundle's claims not started yet (best effort: if the store does not answer,
    their leases expire and the re-sent bundle, or the reaper, takes them then)."""
    waiting = held.waiting()
    try:
        ctx.runner.leases.hand_off_all(waiting)
    except Exception:  # never in the way of the error being handled
        logger.warning("%d bundle shard(s) not handed back; their leases expire", len(waiting), exc_info=True)
    for claim in waiting:
        held.started(claim)  # handed back: not this task's any more


def _carry_out(
    ctx: WorkerContext,
    task: WorkerTask,
    decision: Decision,
    claim: Claim | None = None,
    *,
    request: RunShard | RunFrontier | None = None,
    resend: RunShards | None = None,
    held: HeldLeases | None = None,
    announced: list[Announce] | None = None,
) -> str:
    """Do what `decision` says; returns the task's result, or raises Celery's Retry (RetryLater).

    `claim`: the shard this run held (for a shard's dead letter or a scheduled retry);
    `request`: the task whose shard or job is not recorded (for an unknown shard's dead letter);
    `resend`: what a RetryLater sends again (a bundle's rest), else this task as it came;
    `held`: a bundle's claims not started, handed back before the re-send (which may run at once);
    `announced`: where the shard's `ShardFinished` is put for the caller to publish with others
    (`_announce_all`), instead of published here."""
    if isinstance(decision, RetryLater):
        if held is not None:
            _hand_back(ctx, held)
        # Celery's retry publishes the task again (with confirms) before this delivery is acked.
        kwargs = resend.model_dump() if resend is not None else None
        raise task.retry(kwargs=kwargs, countdown=decision.delay_s, max_retries=None, priority=_priority(task))
    if isinstance(decision, ScheduleRetry):
        assert claim is not None
        if not _schedule_retry(ctx, claim, decision):
            return "failed"  # another worker holds the shard now; it decides
        # The retry waits in MongoDB (RETRY, next_retry_at_ms); the scheduler sends its task when
        # it is due. This delivery is acked now: a worker holding it for the backoff would pass
        # RabbitMQ's consumer_timeout.
        return "retry_scheduled"
    if isinstance(decision, DeadLetter):
        if decision.reason == "contract_violation":
            _dead_letter_invalid(ctx, task, dict(task.request.kwargs or {}), decision.error)
            return "contract_violation"
        if decision.reason == "unknown_shard":
            assert request is not None
            _dead_letter_unknown_shard(ctx, task, request, decision.error)
            return "unknown_shard"
        assert claim is not None
        _dead_letter_shard(ctx, task, claim, decision.error, reason=decision.reason)
        return "poison" if decision.reason == "poison" else "failed"
    if decision.announce is not None and announced is not None:
        announced.append(decision.announce)
    elif decision.announce is not None:
        _announce(ctx, decision.announce)
    if decision.counted:
        metrics.SHARD_OUTCOMES.labels(current_pipeline(), decision.outcome).inc()
    if decision.outcome == "lease_lost" and claim is not None:
        logger.warning("shard %s: lease lost; the worker that holds it now carries on", claim.shard_key)
    return decision.outcome


def _after_failure(ctx: WorkerContext, failure: ShardFailed) -> ScheduleRetry | DeadLetter:
    """The retry policy of the shard's job applied to the failed attempt (counted in FAILURES)."""
    claim, error = failure.claim, failure.error
    rules = _rules(ctx, claim.shard["job_id"])
    retry = decide(error, claim.attempt, rules.policy, rules.declared)
    metrics.FAILURES.labels(failure.pipeline, type(error).__name__, str(retry.retryable).lower()).inc()
    return after_failure(retry, error)


def _schedule_retry(ctx: WorkerContext, claim: Claim, decision: ScheduleRetry) -> bool:
    """Park the shard in RETRY (fenced by its lease); False if another worker holds it now."""
    retry, description = decision.retry, _describe(decision.error)
    fields = retry_fields(claim.shard, retry.record(description))
    # The scheduler sends the retry later: it continues this attempt's trace from the shard.
    fields["retry_trace_context"] = trace_carrier()
    if not ctx.runner.leases.schedule_retry(claim, description, retry_time(retry.delay_s), extra=fields):
        return False
    logger.warning(
        "shard %s attempt %d/%d failed (%s); retry in %.2f s (ceiling %.2f s), sent by the scheduler when due",
        claim.shard_key, claim.attempt, retry.max_attempts, description, retry.delay_s, retry.ceiling_s,
    )
    metrics.RETRIES.labels(current_pipeline()).inc()
    return True


def _rules(ctx: WorkerContext, job_id: str) -> JobRetryRules:
    """The job's retry policy (job spec → pipeline default → worker settings) and error declarations."""
    settings = ctx.settings
    defaults = RetryDefaults(settings.max_attempts, settings.retry_base_delay_s, settings.retry_max_delay_s)
    return rules_for_job(ctx.runner.jobs, job_id, defaults, job=ctx.runner.job(job_id))


def _dead_letter_shard(ctx: WorkerContext, task: WorkerTask, claim: Claim, error: BaseException, *, reason: str) -> None:
    job_id = claim.shard["job_id"]
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason=reason,  # type: ignore[arg-type]
        error=error,
        original=_shard_original(task, job_id, claim.shard_key),
        job_id=job_id,
        shard_key=claim.shard_key,
        attempts=claim.attempt,
    )
    if not ctx.runner.leases.fail(claim, _describe(error), dead_letter.dead_letter_id):
        return  # another worker holds the shard now; it decides
    ctx.publisher.publish(dead_letter)
    ctx.runner.shards.update_one({"_id": claim.shard_key}, {"$set": {"dead_lettered_at": clock.utcnow()}})
    logger.error("shard %s dead-lettered (%s): %s", claim.shard_key, reason, error)
    metrics.SHARD_OUTCOMES.labels(current_pipeline(), "dead_lettered").inc()
    _announce(ctx, Announce(job_id, claim.shard_key, "failed", error=_describe(error)))


def _outage(error: BaseException, claim: Claim | None = None) -> StoreUnavailable:
    """A store error outside a batch (claim, job lookup, lease writes) as the outage it is handled as."""
    return error if isinstance(error, StoreUnavailable) else StoreUnavailable(error, claim)


def _claim_next_or_retry(ctx: WorkerContext, task: WorkerTask, request: RunFrontier) -> Claim | None:
    """The lane's next item; while MongoDB is unreachable, the runner is re-sent (Retry raised)."""
    while True:
        try:
            return ctx.runner.leases.claim_next(request.job_id)
        except (StoreUnavailable, ConnectionFailure) as error:
            # Raises Retry; returns only if the half-claimed item was taken over meanwhile.
            _carry_out(ctx, task, _after_store_outage(ctx, task, _outage(error)))


def _after_store_outage(ctx: WorkerContext, task: WorkerTask, outage: StoreUnavailable) -> Ack | RetryLater:
    """Keep the delivery while MongoDB is unreachable: hand back the lease this run held (once the
    store answers, within one lease TTL: past it the lease has expired anyway), then re-send the
    task after a short capped backoff. No attempt is spent: the hand-off gives the claim's attempt
    back. Ack("lease_lost") if another worker took the shard over meanwhile."""
    claim = outage.claim
    handed_off = _hand_off_when_store_answers(ctx, claim) if isinstance(claim, Claim) else None
    settings = ctx.settings
    decision = after_store_outage(handed_off, task.request.retries, settings.store_retry_base_s, settings.store_retry_max_s)
    if isinstance(decision, RetryLater):
        logger.warning("MongoDB unreachable (%s); task %s retried in %.2f s", outage.error, task.request.id, decision.delay_s)
    elif isinstance(claim, Claim):
        logger.warning("shard %s: taken over while MongoDB was unreachable; this task ends", claim.shard_key)
    return decision


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


def _dead_letter_invalid(ctx: WorkerContext, task: WorkerTask, payload: dict, error: BaseException) -> None:
    original = _original(task, payload)
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="contract_violation",
        error=error,
        original=original,
        dead_letter_id=stable_dead_letter_id(original),  # a redelivery is recorded once
    )
    ctx.publisher.publish(dead_letter)
    logger.error("task %s dead-lettered: payload is not a valid %s", task.request.id, task.name)


def _job_recorded(ctx: WorkerContext, job_id: str) -> bool:
    """Whether the job or any of its work items is in the store (a frontier runner's job)."""
    if ctx.runner.jobs.find_one({"_id": job_id}, {"_id": 1}) is not None:
        return True
    return ctx.runner.shards.find_one({"job_id": job_id}, {"_id": 1}) is not None


def _dead_letter_unknown_shard(ctx: WorkerContext, task: WorkerTask, request: RunShard | RunFrontier, error: BaseException) -> None:
    """A task naming a shard (or a frontier job) that is not recorded: kept in the DLQ (one entry
    however often the task is delivered), not only logged."""
    original = _original(task, request.model_dump(), name=request.message_type)
    dead_letter = dead_letter_for(
        source_service=SERVICE,
        source_queue=QUEUE_INGEST,
        reason="unknown_shard",
        error=error,
        original=original,
        job_id=request.job_id,
        shard_key=getattr(request, "shard_key", None),
        dead_letter_id=stable_dead_letter_id(original, "unknown_shard"),
    )
    ctx.publisher.publish(dead_letter)
    logger.error("%s is not recorded; its task is dead-lettered", error)


def _announce(ctx: WorkerContext, announce: Announce) -> None:
    ctx.publisher.publish(_shard_finished(announce))


def _announce_all(ctx: WorkerContext, announces: list[Announce], *, quietly: bool = False) -> None:
    """Publish the `ShardFinished` of several shards, their confirms awaited together. `quietly`
    (an error is on its way up already): a failure is logged, not raised; the periodic roll-up
    counts a shard whose event was lost."""
    try:
        ctx.publisher.publish_all([_shard_finished(announce) for announce in announces])
    except Exception:
        if not quietly:
            raise
        logger.warning("%d ShardFinished event(s) not published; the periodic roll-up counts them", len(announces), exc_info=True)


def _shard_finished(announce: Announce) -> ShardFinished:
    return ShardFinished(
        job_id=announce.job_id,
        shard_key=announce.shard_key,
        outcome=announce.outcome,
        records_done=announce.records,
        error=announce.error,
    )


def _original(task: WorkerTask, payload: dict, name: str | None = None) -> OriginalMessage:
    """The task message a dead letter keeps: `name` (default: the task's own) with `payload` as
    its kwargs; a shard's task taken out of a bundle names the bundle's task in its headers."""
    name = name or task.name
    headers = {"task": name, "id": task.request.id} | ({"bundle_task": task.name} if name != task.name else {})
    return OriginalMessage(
        body=json.dumps({"task": name, "id": task.request.id, "kwargs": payload}, default=str),
        headers=headers,
        routing_key=(task.request.delivery_info or {}).get("routing_key"),
    )


def _shard_original(task: WorkerTask, job_id: str, shard_key: str) -> OriginalMessage:
    """A dead-lettered shard's original message: its task as delivered, except for a bundle's
    shard, whose own task (RunShard) is what would run it alone, not the bundle of other shards."""
    if task.name == TASK_RUN_SHARDS:
        return _original(task, RunShard(job_id=job_id, shard_key=shard_key).model_dump(), name=TASK_RUN_SHARD)
    return _original(task, dict(task.request.kwargs or {}))


def _priority(task: WorkerTask) -> int | None:
    return (task.request.delivery_info or {}).get("priority")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]
