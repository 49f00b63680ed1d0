"""Periodic safety nets: reclaim shards whose lease expired, re-send lost shard tasks, roll up
running jobs whose shard events were lost, and relay job commands the gateway recorded but
could not publish (the broker was down at the time)."""

import asyncio
import logging
from dataclasses import dataclass

from pydantic import TypeAdapter

from cairn_contracts.jobs import JobSpec
from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS
from cairn_contracts.topology import EXCHANGE_COMMANDS, ROUTING_START_JOB
from cairn_runtime.amqp import Publisher
from cairn_scheduler.jobs import JobScheduler, epoch_ms, utcnow
from cairn_scheduler.reaper import LeaseReaper

logger = logging.getLogger(__name__)

_SPEC = TypeAdapter(JobSpec)


@dataclass(frozen=True)
class Maintenance:
    scheduler: JobScheduler
    publisher: Publisher
    reaper: LeaseReaper
    relay_after_s: float
    redispatch_after_s: float

    async def run_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.reaper.reap()
                await self.reaper.redispatch_stale(self.redispatch_after_s)
                await self.reconcile_running()
                await self.relay_unpublished()
            except Exception:
                logger.exception("maintenance pass failed")
            await asyncio.sleep(interval_s)

    async def reconcile_running(self) -> None:
        jobs = self.scheduler.db[JOBS]
        async for job in jobs.find({"state": {"$in": [JobState.STARTED, JobState.RETRY]}}, {"_id": 1}):
            await self.scheduler.roll_up(job["_id"])

    async def relay_unpublished(self) -> int:
        jobs = self.scheduler.db[JOBS]
        cutoff_ms = epoch_ms() - int(self.relay_after_s * 1000)
        relayed = 0
        query = {"state": JobState.PENDING, "command_published_at": None, "created_at_ms": {"$lt": cutoff_ms}}
        async for job in jobs.find(query):
            command = StartJob(job_id=job["_id"], tenant=job["tenant"], spec=_SPEC.validate_python(job["spec"]))
            await self.publisher.publish(
                EXCHANGE_COMMANDS, ROUTING_START_JOB, command, priority=int(job["spec"]["priority"]), correlation_id=job["_id"]
            )
            await jobs.update_one({"_id": job["_id"], "command_published_at": None}, {"$set": {"command_published_at": utcnow()}})
            logger.info("relayed the command of job %s", job["_id"])
            relayed += 1
        return relayed
