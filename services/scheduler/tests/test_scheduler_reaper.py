"""LeaseReaper against the MongoDB-wire server: expired leases go back to ready and are
dispatched again; lost tasks of queued shards are sent again."""

import functools

from cairn_contracts.clock import now_ms
from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS
from cairn_scheduler.reaper import LeaseReaper
from cairn_testkit.records import seed_shard


class Recorder:
    def __init__(self) -> None:
        self.dispatched: list[tuple[RunShard | RunFrontier, int]] = []

    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        self.dispatched.append((task, priority))


shard = functools.partial(seed_shard, fencing_token=2, attempts=2)  # a shard claimed twice so far


async def test_reap_returns_shards_with_an_expired_lease_to_ready_and_dispatches_them(db) -> None:
    now = now_ms()
    await shard(db, "job:0000", ShardState.RUNNING, lease_until=now - 1_000, taken_by="dead-worker", queued_task="job:bundle")
    await shard(db, "job:0001", ShardState.RUNNING, lease_until=now + 60_000, taken_by="live-worker")
    await shard(db, "job:0002", ShardState.SUCCEEDED, lease_until=now - 1_000)
    recorder = Recorder()

    assert await LeaseReaper(db, recorder).reap() == 1

    reaped = await db[SHARDS].find_one({"_id": "job:0000"})
    assert (reaped["state"], reaped["taken_by"], reaped["reclaims"]) == (ShardState.QUEUED, None, 1)
    assert reaped["fencing_token"] == 2  # the next claim raises it; the dead holder stays fenced out
    assert reaped["queued_task"] is None  # sent alone: fair dispatch counts it as a task of its own
    assert recorder.dispatched == [(RunShard(job_id="job", shard_key="job:0000"), 3)]
    live = await db[SHARDS].find_one({"_id": "job:0001"})
    assert (live["state"], live["taken_by"]) == (ShardState.RUNNING, "live-worker")
    assert (await db[SHARDS].find_one({"_id": "job:0002"}))["state"] == ShardState.SUCCEEDED


async def test_reap_twice_reclaims_once(db) -> None:
    await shard(db, "job:0000", ShardState.RUNNING, lease_until=now_ms() - 1_000)
    recorder = Recorder()
    reaper = LeaseReaper(db, recorder)

    assert await reaper.reap() == 1
    assert await reaper.reap() == 0
    assert len(recorder.dispatched) == 1


async def test_reap_of_a_lease_frontier_item_sends_a_runner_for_its_lane(db) -> None:
    await shard(db, "job:0005", ShardState.RUNNING, strategy="lease_frontier", index=5, lease_until=now_ms() - 1_000)
    recorder = Recorder()

    assert await LeaseReaper(db, recorder).reap() == 1

    assert recorder.dispatched == [(RunFrontier(job_id="job", lane=5), 3)]


async def test_redispatch_lost_resends_the_task_of_each_shard_queued_before_the_cutoff_once(db) -> None:
    now = now_ms()
    await shard(db, "job:0000", ShardState.QUEUED, queued_at_ms=now - 600_000, queued_task="job:bundle")
    await shard(db, "job:0001", ShardState.QUEUED, queued_at_ms=now)
    await shard(db, "job:0002", ShardState.RUNNING, queued_at_ms=now - 600_000)
    await shard(db, "front:0003", ShardState.QUEUED, strategy="lease_frontier", index=3, queued_at_ms=now - 600_000)
    await shard(db, "front:0004", ShardState.QUEUED, strategy="lease_frontier", index=4, queued_at_ms=now - 600_000)
    recorder = Recorder()
    reaper = LeaseReaper(db, recorder)

    assert await reaper.redispatch_lost(cutoff_ms=now - 1) == 2

    # One runner for the frontier job: it pulls every claimable item.
    assert sorted(recorder.dispatched, key=repr) == sorted(
        [(RunShard(job_id="job", shard_key="job:0000"), 3), (RunFrontier(job_id="front", lane=3), 3)], key=repr
    )
    stale = await db[SHARDS].find_one({"_id": "job:0000"})
    assert stale["redispatches"] == 1 and stale["queued_task"] is None  # sent alone
    assert stale["queued_at_ms"] >= now
    assert await reaper.redispatch_lost(cutoff_ms=now - 1) == 0  # the clock restarted
