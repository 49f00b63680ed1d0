"""Firing schedules: every due run exactly once, even with several scheduler processes.

Each tick (`CAIRN_SCHEDULE_TICK_S`) looks for schedules that are not paused and whose
`next_run_at_ms` has passed. A run is *claimed* with one conditional `find_one_and_update` on
`{_id, next_run_at_ms: <the due value>, total_runs: <as read>, paused: false, pending_run: null}`
that advances `next_run_at_ms`, increments `total_runs` and records `pending_run` (its number):
of two schedulers that saw the same due run, exactly one wins. The winner then inserts the job
with the idempotency key `schedule:<id>:<run number>` (so its id is fixed too) and publishes
`StartJob`, and clears `pending_run`. If it dies in between, another tick finds the stale
`pending_run` (older than `RECOVER_AFTER_MS`) and creates the job again, which inserts nothing
twice; a job recorded but not published is relayed like any other (maintenance.py). While a run is
pending the schedule's next run waits, so no run is ever skipped silently.

Catch-up policy: a scheduler that was down (or a schedule whose runs were all missed) fires the
missed run once when it is back, not once per missed tick, and the next run is the first tick
after now (interval schedules keep their phase). Runs fired by schedules do not take the
gateway's job lock; whether a run may overlap the previous one is the schedule's `overlap`.

Overlap policy (`overlap`, like Temporal's), applied when a run is due while the schedule's
previous run (`last_job_id`, scheduled or manual) is still active (PENDING, STARTED, RETRY):
- `skip` (default): the due run is dropped: one conditional update advances `next_run_at_ms` and
  increments `skipped_runs` (a skipped run does not count toward `max_runs`).
- `buffer_one`: the due run is claimed (numbered, counted) but parked in `buffered_run` instead of
  `pending_run`; a later tick that finds the previous run finished moves it to `pending_run` (one
  conditional update) and creates its job as any run. While a run is buffered, further due runs
  are skipped: at most one waits.
- `cancel_other`: as `buffer_one`, and the previous run is asked to cancel (the job is marked
  `cancel_requested` by a conditional update and `CancelJob` is published; the cancel sweep makes
  up for a lost command); the buffered run starts once the cancelled one has stopped.
- `allow_all`: the run starts whatever the previous one is doing.
Quota: a run due while its tenant has `max_running_jobs` unfinished jobs (its `tenants` quota, else
`CAIRN_TENANT_MAX_RUNNING_JOBS`, the gateway's setting) is skipped as above, whatever the policy,
and a buffered run waits; the API refuses such a tenant's submissions with a 429, and a schedule
must not be the way round it (a suspended tenant's schedules would run on, `allow_all` without end).
Each of these is one conditional update on `{_id, next_run_at_ms, total_runs, paused, pending_run}`
as read, so of two schedulers exactly one decides a due run. The previous run's state is read
just before: a run that ends in between is judged still active, which skips or buffers one run
that could have started (never the reverse).
"""

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.messages import CancelJob, StartJob
from cairn_contracts.schedules import OVERLAP_POLICIES, ScheduleTiming
from cairn_contracts.states import ACTIVE_JOB_STATES, state_values
from cairn_contracts.store import DEFAULT_TENANT, JOBS, SCHEDULES, JobRecord
from cairn_contracts.tenancy import TENANTS, TenantQuotas, TenantRecord
from cairn_runtime.amqp import Publisher, PublishNotConfirmed

logger = logging.getLogger(__name__)

RECOVER_AFTER_MS = 15_000
BATCH = 100


def timing_of(schedule: dict[str, Any]) -> ScheduleTiming:
    fields = {name: schedule.get(name) for name in ScheduleTiming.model_fields}
    for name in ("at", "start_at", "end_at"):
        value = schedule.get(f"{name}_ms")
        fields[name] = clock.from_ms_field(value)
    fields["timezone"] = fields.get("timezone") or "UTC"
    return ScheduleTiming.model_validate(fields)


def overlap_of(schedule: dict[str, Any]) -> str:
    """The schedule's overlap policy; `skip` for schedules stored before the field existed."""
    policy = schedule.get("overlap")
    return policy if policy in OVERLAP_POLICIES else "skip"


def run_key(schedule_id: str, run_number: int) -> str:
    return f"schedule:{schedule_id}:{run_number}"


@dataclass(frozen=True)
class ScheduleFirer:
    """Fires due runs (module docstring); `defaults`: the quotas of a tenant that sets none (its
    `max_running_jobs` holds the runs back)."""

    db: AsyncDatabase
    publisher: Publisher
    defaults: TenantQuotas = TenantQuotas()

    async def tick(self, now_ms: int | None = None) -> int:
        """Recover runs left pending, then fire every due run; returns how many this process fired."""
        now_ms = now_ms if now_ms is not None else clock.now_ms()
        await self.recover_pending(now_ms)
        fired = await self.release_buffered(now_ms)
        due = {"paused": False, "next_run_at_ms": {"$lte": now_ms}, "pending_run": None}
        async for schedule in self.db[SCHEDULES].find(due).sort("next_run_at_ms", 1).limit(BATCH):
            fired += int(await self.fire(schedule, now_ms) is not None)
        return fired

    async def fire(self, schedule: dict[str, Any], now_ms: int) -> str | None:
        """Claim the schedule's due run; if this process won it, create the run's job (its id)."""
        due_ms = int(schedule["next_run_at_ms"])
        runs_before = int(schedule.get("total_runs", 0))
        try:
            timing = timing_of(schedule)
        except ValidationError as error:
            logger.error("schedule %s has an invalid timing and is paused: %s", schedule["_id"], error)
            await self.db[SCHEDULES].update_one({"_id": schedule["_id"], "next_run_at_ms": due_ms}, {"$set": {"paused": True, "broken": str(error)[:500]}})
            return None
        run_number = runs_before + 1
        anchor_ms = int(schedule.get("anchor_ms") or due_ms)
        # The due run as read: the filter of every decision about it (claim, skip or buffer).
        as_read = {"_id": schedule["_id"], "next_run_at_ms": due_ms, "total_runs": runs_before, "paused": False, "pending_run": None}
        policy = overlap_of(schedule)
        busy = policy != "allow_all" and await self._previous_run_active(schedule)
        if busy and (policy == "skip" or _buffered_number(schedule) is not None):
            await self._skip(schedule, as_read, timing, now_ms, f"run {schedule.get('last_job_id')} is still active")
            return None
        if await self._tenant_full(schedule):
            await self._skip(schedule, as_read, timing, now_ms, f"tenant {schedule.get('tenant')!r} is at its max_running_jobs quota")
            return None
        # Catch-up: one run for whatever was missed, then the first tick after now.
        next_ms = timing.next_run_ms(max(now_ms, due_ms), anchor_ms=anchor_ms, runs_done=run_number)
        slot = "buffered_run" if busy else "pending_run"
        # Never while a run is buffered: a scheduler holding a stale read would start this run
        # before the buffered one (release_buffered starts that one first, then this one is due).
        as_read["buffered_run"] = None
        claimed = await self.db[SCHEDULES].find_one_and_update(
            as_read,
            {
                "$set": {
                    "next_run_at_ms": next_ms,
                    "next_run_at": clock.from_ms(next_ms) if next_ms is not None else None,
                    "last_due_at_ms": due_ms,
                    slot: {"number": run_number, "due_ms": due_ms, "claimed_at_ms": now_ms},
                    **({} if busy else {"last_run_at_ms": now_ms}),
                },
                "$inc": {"total_runs": 1},
            },
            return_document=ReturnDocument.AFTER,
        )
        if claimed is None:
            return None  # another scheduler claimed it, or the schedule changed meanwhile
        if busy:
            logger.info("schedule %s: run %d buffered (%s): run %s is still active", schedule["_id"], run_number, policy, schedule.get("last_job_id"))
            if policy == "cancel_other":
                await self._cancel_previous(schedule)
            return None
        if due_ms < now_ms - 60_000:
            logger.info("schedule %s: run %d was due %d s ago; fired once (catch-up)", schedule["_id"], run_number, (now_ms - due_ms) // 1000)
        return await self.create_run(claimed, run_number)

    async def release_buffered(self, now_ms: int) -> int:
        """Start every buffered run whose previous run has finished; returns how many this process
        started. The move from `buffered_run` to `pending_run` is one conditional update, so of two
        schedulers one starts it; from there on it is an ordinary pending run (recovered if the
        process dies before creating its job)."""
        started = 0
        waiting = {"paused": False, "buffered_run.number": {"$gte": 1}, "pending_run": None}
        async for schedule in self.db[SCHEDULES].find(waiting).limit(BATCH):
            number = _buffered_number(schedule)
            if number is None or await self._previous_run_active(schedule) or await self._tenant_full(schedule):
                continue
            buffered = schedule["buffered_run"]
            claimed = await self.db[SCHEDULES].find_one_and_update(
                {"_id": schedule["_id"], "paused": False, "buffered_run.number": number, "pending_run": None},
                {
                    "$set": {
                        "pending_run": {"number": number, "due_ms": int(buffered.get("due_ms") or now_ms), "claimed_at_ms": now_ms},
                        "last_run_at_ms": now_ms,
                    },
                    "$unset": {"buffered_run": ""},
                },
                return_document=ReturnDocument.AFTER,
            )
            if claimed is None:
                continue
            logger.info("schedule %s: buffered run %d released (its previous run finished)", schedule["_id"], number)
            started += int(await self.create_run(claimed, number) is not None)
        return started

    async def _previous_run_active(self, schedule: dict[str, Any]) -> bool:
        job_id = schedule.get("last_job_id")
        if not isinstance(job_id, str):
            return False
        found = await self.db[JOBS].find_one({"_id": job_id, "state": {"$in": state_values(ACTIVE_JOB_STATES)}}, {"_id": 1})
        return found is not None

    async def _tenant_full(self, schedule: dict[str, Any]) -> bool:
        """Whether the schedule's tenant has as many unfinished jobs as its `max_running_jobs`."""
        tenant = schedule.get("tenant") or DEFAULT_TENANT
        record = TenantRecord.of(await self.db[TENANTS].find_one({"_id": tenant}, {"quotas": 1}))
        most = record.quotas.merged(self.defaults).max_running_jobs
        if most is None:
            return False
        return await self.db[JOBS].count_documents({"tenant": tenant, "state": {"$in": state_values(ACTIVE_JOB_STATES)}}) >= most

    async def _skip(self, schedule: dict[str, Any], as_read: dict[str, Any], timing: ScheduleTiming, now_ms: int, why: str) -> None:
        due_ms = int(schedule["next_run_at_ms"])
        runs_done = int(schedule.get("total_runs", 0))  # a skipped run does not count toward max_runs
        next_ms = timing.next_run_ms(max(now_ms, due_ms), anchor_ms=int(schedule.get("anchor_ms") or due_ms), runs_done=runs_done)
        skipped = await self.db[SCHEDULES].update_one(
            as_read,
            {
                "$set": {
                    "next_run_at_ms": next_ms,
                    "next_run_at": clock.from_ms(next_ms) if next_ms is not None else None,
                    "last_due_at_ms": due_ms,
                    "last_skipped_at_ms": now_ms,
                },
                "$inc": {"skipped_runs": 1},
            },
        )
        if skipped.modified_count:
            logger.info("schedule %s: run due at %d skipped (%s): %s", schedule["_id"], due_ms, overlap_of(schedule), why)

    async def _cancel_previous(self, schedule: dict[str, Any]) -> None:
        job_id = schedule["last_job_id"]
        marked = await self.db[JOBS].update_one(
            {"_id": job_id, "state": {"$in": state_values(ACTIVE_JOB_STATES)}, "cancel_requested": {"$in": [False, None]}},
            {"$set": {"cancel_requested": True, "cancel_requested_at_ms": clock.now_ms(), "cancel_requested_by": f"schedule:{schedule['_id']}"}},
        )
        if not marked.modified_count:
            return  # finished meanwhile, or already cancelling
        try:
            await self.publisher.publish(CancelJob(job_id=job_id, tenant=schedule["tenant"], requested_by=f"schedule:{schedule['_id']}"), correlation_id=job_id)
        except PublishNotConfirmed:
            logger.warning("cancel of job %s recorded; the command was not confirmed (the sweep will do it)", job_id, exc_info=True)
        logger.info("schedule %s: previous run %s asked to cancel (cancel_other)", schedule["_id"], job_id)

    async def create_run(self, schedule: dict[str, Any], run_number: int) -> str | None:
        schedule_id = schedule["_id"]
        try:
            record = JobRecord.new(
                schedule["job"], schedule["tenant"], idempotency_key=run_key(schedule_id, run_number),
                schedule_id=schedule_id, schedule_run=run_number,
            )
        except ValidationError as error:
            logger.error("schedule %s: its job spec is invalid; run %d skipped: %s", schedule_id, run_number, error)
            await self._settle(schedule_id, run_number, None)
            return None
        try:
            await self.db[JOBS].insert_one(record.to_document())
            created = True
        except DuplicateKeyError:
            created = False  # recorded before a crash; if unpublished, the relay publishes it
        if created:
            await self._publish(record)
            logger.info("schedule %s fired run %d: job %s", schedule_id, run_number, record.id)
        await self._settle(schedule_id, run_number, record.id)
        return record.id

    async def recover_pending(self, now_ms: int) -> int:
        stale = {"pending_run.claimed_at_ms": {"$lt": now_ms - RECOVER_AFTER_MS}}
        recovered = 0
        async for schedule in self.db[SCHEDULES].find(stale).limit(BATCH):
            number = int(schedule["pending_run"]["number"])
            logger.warning("schedule %s: run %d was claimed but not settled; creating its job again", schedule["_id"], number)
            await self.create_run(schedule, number)
            recovered += 1
        return recovered

    async def _publish(self, record: JobRecord) -> None:
        command = StartJob(job_id=record.id, tenant=record.tenant, spec=record.job_spec())
        try:
            await self.publisher.publish(command, priority=record.priority, correlation_id=record.id)
        except PublishNotConfirmed:
            logger.warning("job %s recorded; its command was not confirmed and will be relayed", record.id, exc_info=True)
            return
        await self.db[JOBS].update_one({"_id": record.id}, {"$set": {"command_published_at": clock.utcnow()}})

    async def _settle(self, schedule_id: str, run_number: int, job_id: str | None) -> None:
        fields: dict[str, Any] = {"last_job_id": job_id} if job_id else {}
        update: dict[str, Any] = {"$unset": {"pending_run": ""}}
        if fields:
            update["$set"] = fields
        await self.db[SCHEDULES].update_one({"_id": schedule_id, "pending_run.number": run_number}, update)


def _buffered_number(schedule: dict[str, Any]) -> int | None:
    buffered = schedule.get("buffered_run")
    if isinstance(buffered, dict) and isinstance(buffered.get("number"), int):
        return int(buffered["number"])
    return None
