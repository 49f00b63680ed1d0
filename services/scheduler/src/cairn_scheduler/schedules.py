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
gateway's job lock: overlapping runs of a slow job are allowed (each is its own job).
"""

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.messages import StartJob
from cairn_contracts.schedules import ScheduleTiming
from cairn_contracts.store import JOBS, SCHEDULES, JobRecord
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


def run_key(schedule_id: str, run_number: int) -> str:
    return f"schedule:{schedule_id}:{run_number}"


@dataclass(frozen=True)
class ScheduleFirer:
    db: AsyncDatabase
    publisher: Publisher

    async def tick(self, now_ms: int | None = None) -> int:
        """Recover runs left pending, then fire every due run; returns how many this process fired."""
        now_ms = now_ms if now_ms is not None else clock.now_ms()
        await self.recover_pending(now_ms)
        fired = 0
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
        # Catch-up: one run for whatever was missed, then the first tick after now.
        next_ms = timing.next_run_ms(max(now_ms, due_ms), anchor_ms=int(schedule.get("anchor_ms") or due_ms), runs_done=run_number)
        claimed = await self.db[SCHEDULES].find_one_and_update(
            {"_id": schedule["_id"], "next_run_at_ms": due_ms, "total_runs": runs_before, "paused": False, "pending_run": None},
            {
                "$set": {
                    "next_run_at_ms": next_ms,
                    "next_run_at": clock.from_ms(next_ms) if next_ms is not None else None,
                    "last_run_at_ms": now_ms,
                    "last_due_at_ms": due_ms,
                    "pending_run": {"number": run_number, "due_ms": due_ms, "claimed_at_ms": now_ms},
                },
                "$inc": {"total_runs": 1},
            },
            return_document=ReturnDocument.AFTER,
        )
        if claimed is None:
            return None  # another scheduler claimed it, or the schedule changed meanwhile
        if due_ms < now_ms - 60_000:
            logger.info("schedule %s: run %d was due %d s ago; fired once (catch-up)", schedule["_id"], run_number, (now_ms - due_ms) // 1000)
        return await self.create_run(claimed, run_number)

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
