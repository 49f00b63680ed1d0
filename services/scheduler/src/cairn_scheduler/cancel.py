"""Cancel: the `CancelJob` handler and the periodic sweep behind it.

The gateway marks the job `cancel_requested` and then publishes `CancelJob` (queue
`cairn.scheduler.control`; a schedule's cancel_other does the same). A command for a job that is
not marked is ignored: it belongs to a job deleted and submitted again under the same id since.
Handling it is `JobScheduler.stop`: shards not started become
CANCELLED, running shards are marked and stop at their next batch boundary (the worker announces
them), and the job is rolled up: CANCELLED once every shard is terminal and some were cancelled.
No process is killed and no batch is cut in half; each stopped shard keeps its checkpoint.

The sweep (every `CAIRN_RECONCILE_INTERVAL_S`) applies the cancel again to every marked job that
is not finished: it makes up for a command the broker lost or never confirmed, a shard that a
retry or a reaped lease put back in a waiting state after the cancel, and a planning that raced
with the cancel. It also drops the result of jobs finished longer than `CAIRN_RESULT_TTL_S` ago
(`result_expired`; the gateway then answers 410).
"""

import logging
from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.messages import CancelJob
from cairn_contracts.states import ACTIVE_JOB_STATES, JobState, state_values
from cairn_contracts.store import JOBS
from cairn_runtime.consumer import Unprocessable
from cairn_scheduler.jobs import JobScheduler

logger = logging.getLogger(__name__)

PURGE_BATCH = 500


@dataclass(frozen=True)
class Canceller:
    scheduler: JobScheduler
    result_ttl_s: float

    @property
    def db(self) -> AsyncDatabase:
        return self.scheduler.db

    async def handle(self, command: CancelJob) -> None:
        job = await self.db[JOBS].find_one({"_id": command.job_id, "tenant": command.tenant}, {"state": 1, "cancel_requested": 1})
        if job is None:
            raise Unprocessable(f"job {command.job_id} of tenant {command.tenant} is not recorded")
        if JobState(job["state"]).is_terminal:
            logger.info("job %s is already %s; cancel ignored", command.job_id, job["state"])
            return
        if not job.get("cancel_requested"):
            # Every sender marks the job before it publishes (the gateway, a schedule's
            # cancel_other), so an unmarked job is not the one this command was sent for: the job
            # was deleted and its id submitted again since (the same Idempotency-Key), and this
            # command, delivered late, belongs to the deleted submission.
            logger.warning("cancel of job %s ignored: the job is not marked for a cancel (submitted again since the command was sent)", command.job_id)
            return
        state = await self.scheduler.stop(command.job_id)
        logger.info("cancel of job %s requested by %s applied; job now %s", command.job_id, command.requested_by, state or "stopping")

    async def sweep(self) -> int:
        """Apply the cancel again to marked jobs that are not finished; returns how many."""
        swept = 0
        async for job in self.db[JOBS].find({"cancel_requested": True, "state": {"$in": state_values(ACTIVE_JOB_STATES)}}, {"_id": 1}):
            await self.scheduler.stop(job["_id"])
            swept += 1
        return swept

    async def expire_results(self) -> int:
        cutoff_ms = clock.now_ms() - int(self.result_ttl_s * 1000)
        expired = 0
        found = self.db[JOBS].find({"finished_at_ms": {"$lt": cutoff_ms}, "result_expired": {"$in": [False, None]}}, {"_id": 1}).limit(PURGE_BATCH)
        async for job in found:
            await self.db[JOBS].update_one(
                {"_id": job["_id"], "finished_at_ms": {"$lt": cutoff_ms}},
                {"$set": {"result_expired": True}, "$unset": {"result": ""}},
            )
            expired += 1
        return expired

    async def run_pass(self) -> None:
        """One sweep of stopping jobs and expired results (run every `reconcile_interval_s`)."""
        if swept := await self.sweep():
            logger.info("cancel sweep: %d job(s) still stopping", swept)
        if expired := await self.expire_results():
            logger.info("results of %d job(s) expired", expired)
