"""The lease reaper: shards whose holder stopped renewing its lease go back to ready and are
dispatched again.

Safe with several schedulers: the return to ready is one conditional update on the shard's
state, fencing token and expired lease, so exactly one scheduler wins it and dispatches. The
dispatch comes after the write; if this scheduler dies in between, the shard is `QUEUED`
without a task: `redispatch_stale` sends a task for any shard queued longer than
`CAIRN_REDISPATCH_AFTER_S` (a duplicate task is harmless: the claim makes it a no-op).
"""

import logging
from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.messages import RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS
from cairn_runtime.celery_config import task_for_shard
from cairn_scheduler.jobs import ShardDispatcher, epoch_ms, utcnow
from cairn_scheduler.metrics import LEASE_RECLAIMS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseReaper:
    db: AsyncDatabase
    dispatcher: ShardDispatcher

    async def reap(self) -> int:
        now_ms = epoch_ms()
        reclaimed = 0
        expired = {"state": ShardState.RUNNING, "lease_until": {"$lt": now_ms}}
        fields = {"job_id": 1, "task_key": 1, "fencing_token": 1, "strategy": 1, "priority": 1, "index": 1, "taken_by": 1}
        async for shard in self.db[SHARDS].find(expired, fields):
            won = await self.db[SHARDS].find_one_and_update(
                {"_id": shard["_id"], "fencing_token": shard["fencing_token"], **expired},
                {
                    "$set": {"state": ShardState.QUEUED, "taken_by": None, "reclaimed_at": utcnow(), "queued_at_ms": now_ms},
                    "$inc": {"reclaims": 1},
                },
            )
            if won is None:
                continue  # another scheduler, or a worker's claim, took it first
            reclaimed += 1
            LEASE_RECLAIMS.inc()
            logger.warning(
                "shard %s: lease of %s expired; back to ready (attempts so far counted at claim)",
                shard["task_key"], shard.get("taken_by"),
            )
            await self.dispatcher.dispatch(task_for_shard(shard), int(shard.get("priority", 2)))
        return reclaimed

    async def redispatch_stale(self, older_than_s: float) -> int:
        """Send a task again for push-dispatched shards queued for too long (a lost task)."""
        cutoff_ms = epoch_ms() - int(older_than_s * 1000)
        stale = {"state": ShardState.QUEUED, "strategy": {"$ne": "lease_frontier"}, "queued_at_ms": {"$lt": cutoff_ms}}
        sent = 0
        async for shard in self.db[SHARDS].find(stale, {"job_id": 1, "task_key": 1, "priority": 1, "queued_at_ms": 1}):
            won = await self.db[SHARDS].find_one_and_update(
                {"_id": shard["_id"], "state": ShardState.QUEUED, "queued_at_ms": shard["queued_at_ms"]},
                {"$set": {"queued_at_ms": epoch_ms()}, "$inc": {"redispatches": 1}},
            )
            if won is not None:
                await self.dispatcher.dispatch(RunShard(job_id=shard["job_id"], shard_key=shard["task_key"]), int(shard.get("priority", 2)))
                sent += 1
        return sent
