"""The scheduler's handlers: plan and dispatch a job, roll shard outcomes up into the job.

Every state change is one conditional single-document update, so any handler may run twice
(redelivery, two schedulers) with the same end state.
"""

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.jobs import JOB_SPEC_ADAPTER, JobSpec
from cairn_contracts.messages import MAX_BUNDLE_SHARDS, RunFrontier, ShardFinished, StartJob
from cairn_contracts.pipelines import COUNTED_SPACES, PIPELINES, BrokenEntry, CatalogEntry, CatalogRefusal, check_job
from cairn_contracts.sinks import WRITE_COUNTERS, stale_filter, window_key
from cairn_contracts.states import TERMINAL_JOB_STATES, JobState, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, DEFAULT_TENANT, JOB_TALLIES, JOBS, SHARDS, ShardBucket, ShardRecord
from cairn_contracts.tenancy import tenant_database
from cairn_runtime import tally
from cairn_runtime.celery_config import ShardDispatcher, dispatch_all
from cairn_runtime.consumer import Unprocessable
from cairn_runtime.log import log_context
from cairn_runtime.mongo import insert_new
from cairn_scheduler.bundles import PlannedShard, shard_tasks
from cairn_scheduler.fairness import FairDispatch
from cairn_scheduler.metrics import observe_job_finished
from cairn_scheduler.planner import Plan, ShardPlan, plan_job
from cairn_scheduler.stopping import finish_unplanned, stop_shards

logger = logging.getLogger(__name__)

# Shards (and as many checkpoints) written per round trip while a job is planned; the cancel
# mark is read between chunks, so a cancel stops a large planning within one chunk.
PLAN_CHUNK = 1000
# A job's shard-state/progress snapshot (an O(shards) read) is refreshed by the maintenance pass
# at most every `snapshot_every_s` per this many shards.
SNAPSHOT_SHARDS = 256
# Shard tasks published per bulk dispatch (their confirms awaited together).
DISPATCH_CHUNK = 1000
_ROLL_UP_FIELDS = {
    "state": 1, "shard_count": 1, "created_at": 1, "pipeline": 1, "tenant": 1, "spec_fingerprint": 1, tally.COUNTS: 1, "spec": 1, "created_at_ms": 1,
}


class LockRelease(Protocol):
    async def release_job(self, job: dict[str, Any]) -> bool:
        """Release the gateway's lock of this finished job (tenant, spec_fingerprint, _id)."""


class Dependents(Protocol):
    """The jobs waiting for others (workflows.py: `DependencyRelease`)."""

    async def settle(self, job_id: str) -> JobState | None:
        """Decide a WAITING job from its dependencies: release it, end it, or leave it waiting."""

    async def job_finished(self, job_id: str) -> int:
        """A job reached a terminal state: settle the jobs waiting for it."""


async def catalog_space(db: AsyncDatabase, spec: JobSpec, at: tuple[str | int, ...]) -> tuple[str, dict[str, Any]]:
    """(pipeline version, work space) of a spec from the pipeline catalog. Raises CatalogRefusal
    (located under `at`) when no worker announced the pipeline, its entry is unreadable, or the
    announced schema refuses the spec."""
    document = await db[PIPELINES].find_one({"_id": spec.pipeline})
    try:
        if document is None:
            raise BrokenEntry(f"no pipeline {spec.pipeline!r} is announced")
        entry = CatalogEntry.from_document(document)
    except BrokenEntry as error:
        raise CatalogRefusal([{"loc": [*at, "pipeline"], "msg": str(error), "type": "unknown_pipeline", "input": spec.pipeline}]) from None
    return entry.version, check_job(entry, spec.params, spec.sharding, at=at)


@dataclass(frozen=True)
class JobScheduler:
    db: AsyncDatabase
    dispatcher: ShardDispatcher
    locks: LockRelease | None = None  # the job-fingerprint lock, released when a job is terminal
    dependents: Dependents | None = None  # told of every terminal state written here (workflows)
    # Fair dispatch across tenants (fairness.py); None: every PLANNED shard of a job is sent at once.
    fair: FairDispatch | None = None
    plan_chunk: int = PLAN_CHUNK
    max_bundle_shards: int = MAX_BUNDLE_SHARDS  # small shards per task (bundles.py); 1: a task per shard
    snapshot_every_s: float = 5.0  # the maintenance pass's snapshot period per SNAPSHOT_SHARDS shards

    async def start_job(self, command: StartJob) -> None:
        job = await self.db[JOBS].find_one({"_id": command.job_id})
        if job is None:
            raise Unprocessable(f"job {command.job_id} is not recorded")
        if JobState(job["state"]).is_terminal:
            logger.info("job %s is already %s; command ignored", command.job_id, job["state"])
            return
        if job["state"] == JobState.WAITING:
            # The command of a job recorded with `after`: look at its dependencies now (it may
            # be released at once); its release publishes the StartJob that plans it.
            if self.dependents is not None:
                await self.dependents.settle(command.job_id)
            return
        if job.get("cancel_requested"):
            await self.stop(command.job_id)  # cancelled before it was planned: nothing starts
            return
        # A job released from WAITING had its `params_from` filled in its stored spec (which the
        # worker reads too), after the gateway's StartJob carrying the spec as submitted.
        spec = JOB_SPEC_ADAPTER.validate_python(job["spec"]) if job.get("released_at_ms") else command.spec
        space = job.get("space") or await self._space_from_catalog(command.job_id, spec)
        start, end = int(space["start"]), int(space["end"])
        plan = plan_job(command.job_id, (start, end), spec.sharding)
        if not await self._record_shards(command.job_id, spec, plan, int(job.get("created_at_ms") or 0)):
            logger.info("job %s cancelled while it was being planned; planning stopped", command.job_id)
            await self.stop(command.job_id)  # the shards recorded so far are cancelled, none dispatched
            return
        started = await self.db[JOBS].update_one(
            {"_id": command.job_id, "state": JobState.PENDING},
            {
                "$set": {
                    "state": JobState.STARTED,
                    "shard_count": len(plan.shards),
                    # Known up front for keys and work items; a time window's count is not.
                    "records_total": end - start if space.get("kind", "key_range") in COUNTED_SPACES else None,
                    "weight_total": sum(p.records_estimate for p in plan.shards),  # progress: see tally.py
                    "shard_states": {ShardState.PLANNED: len(plan.shards)},
                    "started_at": clock.utcnow(),
                }
            },
        )
        if started.modified_count:
            logger.info(
                "job %s planned: %d %s shard(s) over %s [%d, %d); job STARTED",
                command.job_id, len(plan.shards), spec.sharding.strategy, space.get("kind", "key_range"), start, end,
            )
        if await self._cancel_requested(command.job_id):
            await self.stop(command.job_id)  # cancelled while it was being planned: dispatch nothing
            return
        if plan.runners is None and self.fair is not None:
            # Within the tenants' in-flight caps (it logs what it sends); the rest as room frees up.
            await self.fair.run_pass()
        elif plan.runners is None:
            await self._dispatch_planned(command.job_id, int(spec.priority), int(spec.batch_size))
        elif await self._dispatch_runners(command.job_id, plan.runners, int(spec.priority)):
            logger.info("job %s: %d lease-frontier runner(s) dispatched", command.job_id, plan.runners)

    async def _space_from_catalog(self, job_id: str, spec: JobSpec) -> dict[str, Any]:
        """The work space of a job recorded without one (a schedule's run: the gateway checked
        the spec when the schedule was written), from the pipeline catalog, kept on the job.
        Raises Unprocessable when the catalog lacks the pipeline or refuses the spec now."""
        try:
            version, space = await catalog_space(self.db, spec, at=("job",))
        except CatalogRefusal as refusal:
            raise Unprocessable(f"job {job_id}: the catalog refuses its spec: {refusal}") from None
        await self.db[JOBS].update_one({"_id": job_id}, {"$set": {"space": space, "pipeline_version": version}})
        return space

    async def _cancel_requested(self, job_id: str) -> bool:
        job = await self.db[JOBS].find_one({"_id": job_id}, {"cancel_requested": 1})
        return bool((job or {}).get("cancel_requested"))

    async def _record_shards(self, job_id: str, spec: JobSpec, plan: Plan, job_created_at_ms: int) -> bool:
        """Record the plan's checkpoints and shards, `plan_chunk` at a time, ignoring those that
        exist (a redelivered command). False if the job was cancelled meanwhile: planning stops
        there, and the caller cancels what was recorded."""
        for chunk in plan.chunks(self.plan_chunk):
            if await self._cancel_requested(job_id):
                return False
            await self._record_chunk(job_id, spec, chunk, job_created_at_ms)
        return True

    async def _record_chunk(self, job_id: str, spec: JobSpec, plans: list[ShardPlan], job_created_at_ms: int) -> None:
        now = clock.utcnow()
        shards = [
            ShardRecord(
                shard_key=p.key,
                job_id=job_id,
                index=p.index,
                strategy=spec.sharding.strategy,
                range_start=p.start,
                range_end=p.end,
                bucket=ShardBucket(modulus=p.bucket[0], remainder=p.bucket[1]) if p.bucket else None,
                records_estimate=p.records_estimate,
                priority=int(spec.priority),
                job_created_at_ms=job_created_at_ms,
                created_at=now,
            )
            for p in plans
        ]
        # Checkpoints first: a shard is only claimable once its checkpoint exists.
        checkpoints = [shard.checkpoint().to_document() for shard in shards]
        await insert_new(self.db[CHECKPOINTS], checkpoints)
        # Those a scheduler of an earlier version recorded before it stopped (this is a
        # redelivery) carry no stamp: stamped now, or no claim of their shards could match them.
        await self.db[CHECKPOINTS].update_many(
            {"_id": {"$in": [c["_id"] for c in checkpoints]}, "job_created_at_ms": None}, {"$set": {"job_created_at_ms": job_created_at_ms}}
        )
        await insert_new(self.db[SHARDS], [shard.to_document() for shard in shards])
        await insert_new(self.db[JOB_TALLIES], tally.empty_buckets(job_id, [shard.shard_key for shard in shards]))

    async def _dispatch_planned(self, job_id: str, priority: int, batch_size: int) -> int:
        """Send the task of every PLANNED shard of the job (small ones in bundles: bundles.py);
        returns how many shards were sent.

        In bulk: the tasks of up to `DISPATCH_CHUNK` shards are published together and their
        confirms awaited together, then one `update_many` marks every PLANNED shard QUEUED."""
        # Publish first, then mark: a crash in between re-dispatches on redelivery, and the
        # worker's lease claim makes the second task a no-op. The reverse order could lose a shard.
        found = self.db[SHARDS].find({"job_id": job_id, "state": ShardState.PLANNED}, {"shard_key": 1, "index": 1, "records_estimate": 1})
        planned = sorted([s async for s in found], key=lambda s: int(s.get("index") or 0))
        tasks = 0
        for first in range(0, len(planned), DISPATCH_CHUNK):
            chunk = [PlannedShard(s["shard_key"], int(s.get("records_estimate") or 0)) for s in planned[first : first + DISPATCH_CHUNK]]
            sent = shard_tasks(job_id, chunk, batch_size, self.max_bundle_shards)
            await dispatch_all(self.dispatcher, sent, priority)
            tasks += len(sent)
        if planned:
            # Only shards still PLANNED: one a worker claimed meanwhile is RUNNING and stays so.
            await self.db[SHARDS].update_many(
                {"job_id": job_id, "state": ShardState.PLANNED},
                {"$set": {"state": ShardState.QUEUED, "queued_at": clock.utcnow(), "queued_at_ms": clock.now_ms()}},
            )
            await self.db[JOBS].update_one(
                {"_id": job_id, "shard_states.PLANNED": len(planned)}, {"$set": {"shard_states": {ShardState.QUEUED: len(planned)}}}
            )
            logger.info("job %s: %d shard(s) dispatched in %d task(s)", job_id, len(planned), tasks)
        return len(planned)

    async def _dispatch_runners(self, job_id: str, runners: int, priority: int) -> bool:
        """Lease frontier: the items stay claimable in MongoDB; `runners` tasks pull them.
        Returns False when a previous delivery of the command sent them already."""
        job = await self.db[JOBS].find_one({"_id": job_id}, {"runners_dispatched_at": 1})
        if job and job.get("runners_dispatched_at"):
            return False  # a redelivered command: the runners are out already
        await dispatch_all(self.dispatcher, [RunFrontier(job_id=job_id, lane=lane) for lane in range(runners)], priority)
        await self.db[JOBS].update_one({"_id": job_id}, {"$set": {"runners_dispatched_at": clock.utcnow()}})
        return True

    async def shard_finished(self, event: ShardFinished) -> None:
        """`shards_finished` of one event."""
        await self.shards_finished([event])

    async def shards_finished(self, events: list[ShardFinished]) -> None:
        """Count the events' shards into their jobs (exactly once, sharing the round trips:
        `tally.count_many`), then roll each job up once from the job document its last counting
        write returned (no second read of the job; read if nothing was written for it). One fair
        dispatch refill for the lot. Idempotent: a batch failing part-way is redelivered whole.
        A refill that fails (the broker refusing the tasks) is logged and left to the periodic
        pass: the events are counted, and redelivering them would only run the refill again."""
        written = await tally.count_many(self.db, [event.shard_key for event in events], fields=_ROLL_UP_FIELDS)
        for job_id in dict.fromkeys([*(event.job_id for event in events), *written]):
            await self.roll_up_counted(job_id, job=written.get(job_id))
        if self.fair is not None and events:
            try:
                await self.fair.after_shard_finished()  # their room goes to the next tenants in turn
            except Exception:
                logger.exception("fair dispatch: a refill pass after %d shard event(s) failed; the periodic pass sends it", len(events))

    async def stop(self, job_id: str) -> JobState | None:
        """Apply a cancel (idempotent): shards not started are cancelled, running ones are marked
        to stop at their next batch boundary; the job is rolled up (CANCELLED once all stopped)."""
        await stop_shards(self.db, job_id)
        state = await self.roll_up(job_id)
        if state is None and await finish_unplanned(self.db, job_id):
            state = JobState.CANCELLED
            logger.info("job %s cancelled before it was planned", job_id)
            job = await self.db[JOBS].find_one({"_id": job_id}, {"tenant": 1, "spec_fingerprint": 1})
            if job is not None and self.locks is not None:
                await self.locks.release_job(job)
            if self.dependents is not None:
                await self.dependents.job_finished(job_id)
        return state

    async def roll_up_counted(self, job_id: str, job: dict[str, Any] | None = None) -> JobState | None:
        """Derive the job's state from its counters (one document read; idempotent; safe to run
        anywhere): what every shard event does. Only a terminal state is derived here; STARTED
        and RETRY are `roll_up`'s. `job`: the job as just written (with `_ROLL_UP_FIELDS`), to
        spare the read."""
        if job is None:
            job = await self.db[JOBS].find_one({"_id": job_id}, _ROLL_UP_FIELDS)
        if job is None or JobState(job["state"]).is_terminal or not job.get("shard_count"):
            return None
        shard_count = int(job["shard_count"])
        state = job_state_from(_terminal_states(tally.counts_of(job)), shard_count)
        if not state.is_terminal:
            return JobState(job["state"])
        # Once per job: check the ledger against the shards (a count lost to a race with a DLQ
        # replay, say) before the result is written; O(shards), but only here and in reconcile.
        if await tally.uncounted(self.db, job_id):
            job = await self.db[JOBS].find_one({"_id": job_id}, _ROLL_UP_FIELDS) or job
            state = job_state_from(_terminal_states(tally.counts_of(job)), shard_count)
            if not state.is_terminal:
                return JobState(job["state"])
        return await self._finish(job, state)

    async def roll_up(self, job_id: str, *, force: bool = True) -> JobState | None:
        """The full roll-up of a job from its shards (O(shards): the periodic pass, a cancel; not
        the event path): count shards whose event was lost, refresh the job's shard-state
        snapshot and progress (what the status shows of running shards), STARTED <-> RETRY,
        then `roll_up_counted`. Idempotent; returns the job's state (None: unplanned, unknown
        or already terminal). `force=False` (the maintenance loop): a large job's snapshot is
        refreshed at most every `snapshot_every_s` per `SNAPSHOT_SHARDS` shards, so the pass
        costs about the same for any job size; its counters need no pass (events keep them)."""
        job = await self.db[JOBS].find_one({"_id": job_id}, {"state": 1, "shard_count": 1, "progress.at_ms": 1})
        if job is None or JobState(job["state"]).is_terminal or not job.get("shard_count"):
            return None
        if not force and not self._snapshot_due(job):
            return await self.roll_up_counted(job_id)
        shards = [s async for s in self.db[SHARDS].find({"job_id": job_id}, tally.SHARD_FIELDS)]
        await tally.uncounted(self.db, job_id, shards)
        states = Counter([s["state"] for s in shards])
        checkpoints = [c async for c in self.db[CHECKPOINTS].find({"job_id": job_id}, _PROGRESS_FIELDS)]
        percent, records_done = snapshot_progress(checkpoints)
        writes = {counter: sum(int(c.get(counter) or 0) for c in checkpoints) for counter in WRITE_COUNTERS}
        update: dict[str, Any] = {
            "shard_states": dict(states),
            "progress": {"percent": percent, "records_done": records_done, "writes": writes, "at_ms": clock.now_ms()},
        }
        live = job_state_from(states, int(job["shard_count"]))
        if live in (JobState.STARTED, JobState.RETRY) and job["state"] in (JobState.STARTED, JobState.RETRY):
            update["state"] = live
        written = await self.db[JOBS].update_one({"_id": job_id, "state": job["state"]}, {"$set": update})
        if written.modified_count and update.get("state", job["state"]) != job["state"]:
            with log_context(job_id=job_id):
                logger.info("job %s %s -> %s (shards: %s)", job_id, job["state"], update["state"], _shard_summary(states))
        return await self.roll_up_counted(job_id)

    def _snapshot_due(self, job: dict[str, Any]) -> bool:
        taken = tally.as_dict(job.get("progress")).get("at_ms")
        if not isinstance(taken, int):
            return True
        every_ms = self.snapshot_every_s * 1000 * max(1.0, int(job.get("shard_count") or 0) / SNAPSHOT_SHARDS)
        return clock.now_ms() - taken >= 0.8 * every_ms  # slack: passes come every period, give or take

    async def _finish(self, job: dict[str, Any], state: JobState) -> JobState:
        job_id = job["_id"]
        counts = tally.counts_of(job)
        finished_at = clock.utcnow()
        update: dict[str, Any] = {
            "state": state,
            "shard_states": {str(s): n for s, n in _terminal_states(counts).items() if n},
            "finished_at": finished_at,
            "finished_at_ms": clock.to_ms(finished_at),  # result retention compares it
            "result": await self._result(job_id, counts),
        }
        if state == JobState.SUCCESS and (job.get("spec") or {}).get("write_mode") == "replace_window":
            # Before the SUCCESS write: if this process dies in between, the job is still
            # STARTED and the next roll-up deletes again (a repeat deletes nothing more).
            update["result"]["records_deleted"] = await self._delete_stale(job_id, job)
        # Only from the counters this decision read: a DLQ replay that took a shard back out
        # meanwhile changed them, and the roll-up its next event runs decides again.
        counted_as = {f"{tally.COUNTS}.{name}": counts[name] or {"$in": [0, None]} for name in tally.SHARD_COUNTERS.values()}
        written = await self.db[JOBS].update_one(
            {"_id": job_id, "state": {"$nin": state_values(TERMINAL_JOB_STATES)}, **counted_as}, {"$set": update}
        )
        if written.modified_count:
            # One line per transition: the roll-up runs for every event and every few seconds,
            # but a state is written (and logged) once. The maintenance loop has no job context.
            with log_context(job_id=job_id):
                logger.info("job %s %s -> %s (shards: %s)", job_id, job["state"], state, _shard_summary(Counter(update["shard_states"])))
            observe_job_finished(job, state, finished_at)
            if self.locks is not None:
                await self.locks.release_job(job)
        if self.dependents is not None:
            # Also when another roll-up wrote the state first: releasing is idempotent, and a
            # roll-up that died between its write and this call is made up for here or by the sweep.
            await self.dependents.job_finished(job_id)
        return state

    async def _delete_stale(self, job_id: str, job: dict[str, Any]) -> int:
        """A succeeded replace_window job's refresh: delete its window's records that no run
        started at or after this one wrote (cairn_contracts.sinks); returns how many."""
        spec = job["spec"]
        window = window_key(spec)
        # In the job's tenant namespace, where its records are (cairn_contracts.tenancy).
        records_db = self.db.client[tenant_database(self.db.name, job.get("tenant") or DEFAULT_TENANT)]
        deleted = await records_db[spec["target_collection"]].delete_many(stale_filter(window, int(job.get("created_at_ms") or 0)))
        # Roll-ups run concurrently (events, the maintenance loop): each adds what it deleted to
        # the job's `records_deleted`, so the total is right whichever one writes SUCCESS (the
        # gateway reads the field, not only the result written with SUCCESS).
        total = await self.db[JOBS].find_one_and_update(
            {"_id": job_id},
            {"$inc": {"records_deleted": int(deleted.deleted_count)}},
            projection={"records_deleted": 1},
            return_document=ReturnDocument.AFTER,
        )
        with log_context(job_id=job_id):
            logger.info("job %s: %d stale records of window %s deleted", job_id, deleted.deleted_count, window)
        return int((total or {}).get("records_deleted") or 0)

    async def _result(self, job_id: str, counts: dict[str, int]) -> dict[str, Any]:
        return {
            **{field: counts[field] for field in tally.TOTALS},
            "shards_succeeded": counts["shards_succeeded"],
            "shards_failed": counts["shards_failed"],
            "shards_cancelled": counts["shards_cancelled"],
            "failed_shards": await tally.failed_shard_keys(self.db, job_id),
        }


_PROGRESS_FIELDS = {
    "cursor": 1, "position": 1, "done": 1, "range_start": 1, "range_end": 1, "records_estimate": 1, "records_done": 1,
    **dict.fromkeys(WRITE_COUNTERS, 1),
}


def snapshot_progress(checkpoints: list[dict[str, Any]]) -> tuple[float, int]:
    """(percent 0-100 rounded to 0.01, records done) from a job's checkpoints: each shard counts
    for its share of its key range (its `position`, else an integer `cursor`; an opaque cursor
    without a position counts as not started), weighted by its expected records."""
    done_weight = total_weight = 0.0
    records_done = 0
    for checkpoint in checkpoints:
        start, end = int(checkpoint.get("range_start") or 0), int(checkpoint.get("range_end") or 0)
        span = max(1, end - start)
        weight = float(checkpoint.get("records_estimate") or span)
        position = end if checkpoint.get("done") else checkpoint.get("position", checkpoint.get("cursor"))
        if isinstance(position, int) and not isinstance(position, bool):
            done_weight += weight * min(1.0, max(0.0, (position - start) / span))
        total_weight += weight
        records_done += int(checkpoint.get("records_done") or 0)
    return (round(100.0 * done_weight / total_weight, 2) if total_weight else 0.0), records_done


def _terminal_states(counts: dict[str, int]) -> Counter:
    return Counter({state: counts[field] for state, field in tally.SHARD_COUNTERS.items()})


def _shard_summary(states: Counter) -> str:
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items())) or "none"


def job_state_from(states: Counter, shard_count: int) -> JobState:
    succeeded = states.get(ShardState.SUCCEEDED, 0)
    failed = states.get(ShardState.FAILED, 0)
    cancelled = states.get(ShardState.CANCELLED, 0)
    if cancelled and succeeded + failed + cancelled == shard_count:
        return JobState.CANCELLED  # every shard terminal, some stopped by a cancel
    if succeeded == shard_count:
        return JobState.SUCCESS
    if succeeded + failed == shard_count:
        return JobState.FAILURE
    if states.get(ShardState.RETRY, 0):
        return JobState.RETRY
    return JobState.STARTED

