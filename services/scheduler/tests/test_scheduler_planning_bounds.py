"""Bounded planning (issue 11, item 8): a plan is computed lazily, recorded in chunks, stopped by a
cancel between chunks; and each job transition is logged once, naming the job (item 16)."""

import asyncio
import logging
import tracemalloc
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pytest

from cairn_contracts.jobs import LeaseFrontierSharding, RangeSharding
from cairn_contracts.messages import CancelJob, RunFrontier, RunShard, ShardFinished, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_scheduler.cancel import Canceller
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.planner import plan_lease_frontier, plan_range, split_range


class Dispatched:
    def __init__(self) -> None:
        self.tasks: list[RunShard | RunFrontier] = []

    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        self.tasks.append(task)


def lease_frontier_command(job_id: str, count: int, item_size: int = 1, runners: int = 2) -> StartJob:
    return StartJob.model_validate(
        {
            "job_id": job_id,
            "tenant": "default",
            "spec": {
                "pipeline": "synthetic",
                "params": {"count": count},
                "sharding": {"strategy": "lease_frontier", "shards": runners, "item_size": item_size},
            },
        }
    )


async def record_job(db: Any, cmd: StartJob) -> None:
    await db[JOBS].insert_one(
        {
            "_id": cmd.job_id,
            "tenant": cmd.tenant,
            "pipeline": cmd.spec.pipeline,
            "priority": int(cmd.spec.priority),
            "spec": cmd.spec.model_dump(mode="json"),
            "state": JobState.PENDING,
            "created_at": datetime.now(UTC),
        }
    )


# --- the plan itself (pure) ------------------------------------------------------------------


def test_a_plan_of_many_items_is_computed_lazily() -> None:
    tracemalloc.start()
    try:
        plan = plan_lease_frontier("job", 0, 200_000, LeaseFrontierSharding(shards=4, item_size=1))
        first_chunk = list(islice(plan.shards, 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(plan.shards) == 200_000
    assert len(first_chunk) == 1000 and first_chunk[-1].index == 999
    # 200,000 shard plans built at once take tens of MB; a lazy plan holds one chunk.
    assert peak < 2_000_000, f"planning held {peak} bytes"


def test_a_lazy_plan_gives_the_same_shards_as_split_range() -> None:
    for start, end, parts in [(0, 10, 4), (-50, 50, 16), (3, 100, 1), (0, 1024, 1024), (7, 9, 5)]:
        plan = plan_range("job", start, end, RangeSharding(shards=parts))
        assert [(p.start, p.end) for p in plan.shards] == split_range(start, end, parts)
        assert [p.index for p in plan.shards] == list(range(len(plan.shards)))
        assert plan.shards[-1] == list(plan.shards)[-1]
        assert [p for chunk in plan.chunks(3) for p in chunk] == list(plan.shards)


def test_an_item_far_down_a_plan_is_computed_directly() -> None:
    plan = plan_lease_frontier("job", 0, 100_003, LeaseFrontierSharding(shards=4, item_size=3))

    assert len(plan.shards) == 33_335
    assert [(p.start, p.end) for p in plan.shards[:2]] == [(0, 3), (3, 6)]
    last = plan.shards[-1]
    assert (last.index, last.start, last.end, last.key) == (33_334, 100_001, 100_003, "job:33334")
    with pytest.raises(IndexError):
        plan.shards[33_335]


# --- recording it (MongoDB-wire server) ------------------------------------------------------


async def test_a_plan_is_recorded_in_chunks_and_a_redelivery_adds_nothing(db) -> None:
    cmd = lease_frontier_command("plan-chunks", count=250)
    await record_job(db, cmd)
    dispatcher = Dispatched()
    scheduler = JobScheduler(db, dispatcher, plan_chunk=100)

    await scheduler.start_job(cmd)
    await scheduler.start_job(cmd)  # redelivered: every chunk is a duplicate now

    assert await db[SHARDS].count_documents({"job_id": "plan-chunks"}) == 250
    assert await db[CHECKPOINTS].count_documents({"job_id": "plan-chunks"}) == 250
    assert dispatcher.tasks == [RunFrontier(job_id="plan-chunks", lane=0), RunFrontier(job_id="plan-chunks", lane=1)]
    job = await db[JOBS].find_one({"_id": "plan-chunks"})
    assert (job["state"], job["shard_count"]) == (JobState.STARTED, 250)


async def test_a_cancel_during_planning_stops_it_between_chunks(db) -> None:
    items = 4000
    cmd = lease_frontier_command("plan-cancel", count=items)
    await record_job(db, cmd)
    dispatcher = Dispatched()
    scheduler = JobScheduler(db, dispatcher, plan_chunk=50)
    canceller = Canceller(scheduler, result_ttl_s=60)

    planning = asyncio.create_task(scheduler.start_job(cmd))
    # The cancel arrives (as the gateway sends it) once planning has begun.
    async with asyncio.timeout(60):
        while not await db[SHARDS].count_documents({"job_id": "plan-cancel"}):
            await asyncio.sleep(0)
        await db[JOBS].update_one({"_id": "plan-cancel"}, {"$set": {"cancel_requested": True}})
        await canceller.handle(CancelJob(job_id="plan-cancel", tenant="default", requested_by="test"))
        await planning

    recorded = await db[SHARDS].count_documents({"job_id": "plan-cancel"})
    assert 0 < recorded < items, "planning went on after the cancel"
    states = {s["state"] async for s in db[SHARDS].find({"job_id": "plan-cancel"}, {"state": 1})}
    assert states == {ShardState.CANCELLED}
    assert (await db[JOBS].find_one({"_id": "plan-cancel"}))["state"] == JobState.CANCELLED
    assert dispatcher.tasks == []


# --- one log line per job transition (item 16) -----------------------------------------------


async def test_planning_dispatch_and_each_job_transition_are_logged_once_with_the_job_id(db, caplog) -> None:
    cmd = StartJob.model_validate(
        {"job_id": "logged-job", "tenant": "default", "spec": {"pipeline": "synthetic", "params": {"count": 20}, "sharding": {"shards": 2}}}
    )
    await record_job(db, cmd)
    scheduler = JobScheduler(db, Dispatched())
    caplog.set_level(logging.INFO, logger="cairn_scheduler")

    await scheduler.start_job(cmd)
    await db[SHARDS].update_many({"job_id": "logged-job"}, {"$set": {"state": ShardState.SUCCEEDED}})
    for key in ("logged-job:0000", "logged-job:0001", "logged-job:0000"):  # an event per shard plus a redelivery: one transition
        await scheduler.shard_finished(ShardFinished(job_id="logged-job", shard_key=key, outcome="succeeded", records_done=10))

    lines = [r.getMessage() for r in caplog.records if "logged-job" in r.getMessage()]
    assert any("planned: 2 range shard(s)" in line and "STARTED" in line for line in lines), lines
    assert any("2 shard(s) dispatched in 1 task(s)" in line for line in lines), lines
    assert len([line for line in lines if "-> SUCCESS" in line]) == 1, lines
