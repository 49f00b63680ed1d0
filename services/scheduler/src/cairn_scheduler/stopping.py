"""Stopping a job's shards for a cancel: the bulk marks that the scheduler's cancel applies.

- every shard and checkpoint of the job gets `cancel_requested: true` (update_many, idempotent):
  a worker's claim refuses a marked shard, and a running shard sees the mark on its checkpoint
  when it commits its next batch, then stops (leases.py, runner.py in the worker);
- shards that have not started (PLANNED, QUEUED, RETRY) become CANCELLED at once (update_many
  conditional on those states, so a shard a worker claimed a moment ago is left to stop itself).

A job cancelled before it was planned has no shards: it is finished here directly, conditional
on it still being PENDING with no unfinished shard.
"""

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.sinks import CHECKPOINT_COUNTERS
from cairn_contracts.states import TERMINAL_SHARD_STATES, WAITING_SHARD_STATES, JobState, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS


async def stop_shards(db: AsyncDatabase, job_id: str) -> int:
    """Mark the job's shards and checkpoints; cancel the ones not started. Returns how many were."""
    unmarked = {"job_id": job_id, "cancel_requested": {"$in": [False, None]}}
    await db[CHECKPOINTS].update_many(unmarked, {"$set": {"cancel_requested": True}})
    await db[SHARDS].update_many(unmarked, {"$set": {"cancel_requested": True}})
    moved = await db[SHARDS].update_many(
        {"job_id": job_id, "state": {"$in": state_values(WAITING_SHARD_STATES)}},
        {
            "$set": {
                "state": ShardState.CANCELLED,
                "finished_at": clock.utcnow(),
                "cancelled_at_ms": clock.now_ms(),
                "lease_until": None,
                "taken_by": None,
            }
        },
    )
    return moved.modified_count


async def finish_unplanned(db: AsyncDatabase, job_id: str) -> bool:
    """CANCELLED for a job that never got past PENDING (or WAITING for its dependencies); True
    if this call finished it."""
    unfinished = await db[SHARDS].count_documents(
        {"job_id": job_id, "state": {"$nin": state_values(TERMINAL_SHARD_STATES)}}
    )
    if unfinished:
        return False
    now = clock.utcnow()
    written = await db[JOBS].update_one(
        {"_id": job_id, "state": {"$in": [JobState.WAITING, JobState.PENDING]}},
        {
            "$set": {
                "state": JobState.CANCELLED,
                "finished_at": now,
                "finished_at_ms": clock.to_ms(now),
                "result": empty_result(),
            }
        },
    )
    return written.modified_count == 1


def empty_result() -> dict[str, Any]:
    return {
        **dict.fromkeys(CHECKPOINT_COUNTERS, 0),
        "shards_succeeded": 0, "shards_failed": 0, "shards_cancelled": 0, "failed_shards": [],
    }
