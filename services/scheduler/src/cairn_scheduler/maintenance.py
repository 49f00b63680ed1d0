"""Periodic safety nets: reclaim shards whose lease expired, re-send provably lost shard tasks,
roll up running jobs whose shard events were lost, and relay job commands the gateway recorded
but could not publish (the broker was down at the time). And, on a loop of its own, the dispatch
of due retries (a retry waits in MongoDB, not in a worker)."""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cairn_contracts import clock
from cairn_contracts.jobs import JOB_SPEC_ADAPTER
from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS
from cairn_runtime.amqp import Publisher
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.reaper import LeaseReaper, LostTaskWatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Maintenance:
    scheduler: JobScheduler
    publisher: Publisher
    reaper: LeaseReaper
    relay_after_s: float
    redispatch_after_s: float
    # Ready messages of the ingest queue (raises if the broker cannot answer); None: lost tasks are
    # never re-sent (nothing could prove them lost).
    ingest_ready: Callable[[], Awaitable[int]] | None = None
    lost_tasks: LostTaskWatch = field(default_factory=LostTaskWatch)

    async def run_pass(self) -> None:
        """One maintenance pass (run every `reconcile_interval_s` by `run_every`)."""
        await self.reaper.reap()
        await self.redispatch_lost()
        await self.reconcile_running()
        await self.relay_unpublished()

    async def redispatch_lost(self) -> int:
        """Observe the ingest queue once, then re-send the tasks it proves lost (`LostTaskWatch`)."""
        ready: int | None = None
        if self.ingest_ready is not None:
            try:
                ready = await self.ingest_ready()
            except Exception:
                logger.warning("the ingest queue's depth could not be read; no task is judged lost", exc_info=True)
        now_ms = clock.now_ms()
        self.lost_tasks.observe(ready, now_ms)
        cutoff_ms = self.lost_tasks.cutoff_ms(now_ms, self.redispatch_after_s)
        if cutoff_ms is None:
            return 0
        sent = await self.reaper.redispatch_lost(cutoff_ms)
        if sent:
            self.lost_tasks.restart()  # the re-sent tasks are new: a loss among them needs a new proof
        return sent

    async def dispatch_due_retries(self, max_sleep_s: float) -> float:
        """Send the due retries; returns the seconds until the earliest waiting retry, at most
        `max_sleep_s` (a retry scheduled meanwhile for sooner waits at most that long): run by
        `run_every(max_sleep_s, ...)`, which sleeps that long before the next call."""
        due = await self.reaper.dispatch_due_retries()
        return retry_sleep_s(due.next_due_ms, clock.now_ms(), max_sleep_s, due.due_left)

    async def reconcile_running(self) -> None:
        jobs = self.scheduler.db[JOBS]
        async for job in jobs.find({"state": {"$in": [JobState.STARTED, JobState.RETRY]}}, {"_id": 1}):
            await self.scheduler.roll_up(job["_id"], force=False)

    async def relay_unpublished(self) -> int:
        jobs = self.scheduler.db[JOBS]
        cutoff_ms = clock.now_ms() - int(self.relay_after_s * 1000)
        relayed = 0
        query = {"state": JobState.PENDING, "command_published_at": None, "created_at_ms": {"$lt": cutoff_ms}}
        async for job in jobs.find(query):
            command = StartJob(job_id=job["_id"], tenant=job["tenant"], spec=JOB_SPEC_ADAPTER.validate_python(job["spec"]))
            await self.publisher.publish(command, priority=int(job["spec"]["priority"]), correlation_id=job["_id"])
            await jobs.update_one({"_id": job["_id"], "command_published_at": None}, {"$set": {"command_published_at": clock.utcnow()}})
            logger.info("relayed the command of job %s", job["_id"])
            relayed += 1
        return relayed


def retry_sleep_s(next_due_ms: int | None, now_ms: int, max_sleep_s: float, due_left: bool = False) -> float:
    """Seconds until the due-retry dispatcher looks again: 0 if due retries are left over, else
    until `next_due_ms` (at least 10 ms), never more than `max_sleep_s`."""
    if due_left:
        return 0.0
    if next_due_ms is None:
        return float(max_sleep_s)
    return float(min(max_sleep_s, max(0.01, (next_due_ms - now_ms) / 1000)))
