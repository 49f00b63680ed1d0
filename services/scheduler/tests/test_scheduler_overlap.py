"""Schedule overlap policies (skip, buffer_one, allow_all, cancel_other) against the real store
and broker: each decision about a due run is one conditional update of the schedule."""

import asyncio
import time
import uuid

import pytest
from pymongo import AsyncMongoClient

from cairn_contracts.messages import CancelJob
from cairn_contracts.schedules import ScheduleTiming
from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS, SCHEDULES, JobRecord
from cairn_contracts.tenancy import TENANTS
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_CONTROL
from cairn_scheduler.schedules import ScheduleFirer
from cairn_testkit.aio import drain

SPEC = {"pipeline": "synthetic", "params": {"count": 40}, "sharding": {"shards": 1}}
MINUTE = 60_000


@pytest.fixture
async def firer(db, broker):
    await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    await drain(broker.queues[QUEUE_SCHEDULER_CONTROL])
    return ScheduleFirer(db, broker.publisher)


async def interval_schedule(db, now_ms: int, overlap: str | None) -> str:
    """An every-minute schedule due now whose previous run (run 1) is a STARTED job."""
    timing = ScheduleTiming.model_validate({"kind": "interval", "interval_s": 60})
    schedule_id = uuid.uuid4().hex
    previous = JobRecord.new(SPEC, "acme", idempotency_key=f"schedule:{schedule_id}:1", schedule_id=schedule_id, schedule_run=1)
    document = previous.to_document()
    document["state"] = str(JobState.STARTED)
    await db[JOBS].insert_one(document)
    fields = {
        "_id": schedule_id, "tenant": "acme", "name": "s", "job": SPEC, "paused": False,
        **timing.timing_fields(), "anchor_ms": now_ms - 10, "next_run_at_ms": now_ms - 10, "total_runs": 1,
        "manual_runs": 0, "created_at_ms": now_ms - MINUTE, "last_job_id": previous.id,
    }
    if overlap is not None:
        fields["overlap"] = overlap
    await db[SCHEDULES].insert_one(fields)
    return schedule_id


async def finish(db, job_id: str, state: JobState = JobState.SUCCESS) -> None:
    await db[JOBS].update_one({"_id": job_id}, {"$set": {"state": str(state)}})


async def runs(db, schedule_id: str) -> list[int]:
    return sorted([j["schedule_run"] async for j in db[JOBS].find({"schedule_id": schedule_id})])


@pytest.mark.parametrize("overlap", [None, "skip"])
async def test_skip_drops_a_run_due_while_the_previous_one_runs(db, firer, overlap) -> None:
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, overlap)

    assert await firer.tick(now) == 0

    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert (stored["skipped_runs"], stored["total_runs"], stored["next_run_at_ms"]) == (1, 1, now - 10 + MINUTE)
    assert "buffered_run" not in stored and await runs(db, schedule_id) == [1]

    await finish(db, stored["last_job_id"])
    assert await firer.tick(now + MINUTE) == 1  # the next due run starts once the previous one is done
    assert await runs(db, schedule_id) == [1, 2]


async def test_buffer_one_keeps_one_run_and_starts_it_when_the_previous_one_ends(db, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, "buffer_one")

    assert await firer.tick(now) == 0
    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert (stored["buffered_run"]["number"], stored["total_runs"], stored["next_run_at_ms"]) == (2, 2, now - 10 + MINUTE)

    assert await firer.tick(now + MINUTE) == 0  # a second overlapping run: the buffer is full, skipped
    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert (stored["buffered_run"]["number"], stored["skipped_runs"], stored["total_runs"]) == (2, 1, 2)
    assert await runs(db, schedule_id) == [1]

    await finish(db, stored["last_job_id"], JobState.FAILURE)
    assert await firer.tick(now + MINUTE + 1) == 1

    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert "buffered_run" not in stored and "pending_run" not in stored
    assert await runs(db, schedule_id) == [1, 2]
    assert stored["last_job_id"] == (await db[JOBS].find_one({"schedule_id": schedule_id, "schedule_run": 2}))["_id"]


async def test_allow_all_starts_overlapping_runs(db, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, "allow_all")

    assert await firer.tick(now) == 1

    assert await runs(db, schedule_id) == [1, 2]


async def test_cancel_other_cancels_the_previous_run_and_starts_after_it_stopped(db, firer, broker) -> None:
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, "cancel_other")
    previous_id = (await db[SCHEDULES].find_one({"_id": schedule_id}))["last_job_id"]

    assert await firer.tick(now) == 0

    previous = await db[JOBS].find_one({"_id": previous_id})
    assert previous["cancel_requested"] and previous["cancel_requested_by"] == f"schedule:{schedule_id}"
    commands = [CancelJob.model_validate_json(m.body) for m in await drain(broker.queues[QUEUE_SCHEDULER_CONTROL])]
    assert [c.job_id for c in commands] == [previous_id]
    assert await firer.tick(now + 1) == 0  # still cancelling: the buffered run waits
    assert await runs(db, schedule_id) == [1]

    await finish(db, previous_id, JobState.CANCELLED)
    assert await firer.tick(now + 2) == 1
    assert await runs(db, schedule_id) == [1, 2]


async def test_two_schedulers_release_a_buffered_run_once(db, firer, broker, test_env) -> None:
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, "buffer_one")
    await firer.tick(now)
    await finish(db, (await db[SCHEDULES].find_one({"_id": schedule_id}))["last_job_id"])
    other_client = AsyncMongoClient(test_env.mongodb_uri, tz_aware=True)
    try:
        other = ScheduleFirer(other_client[db.name], broker.publisher)
        started = await asyncio.gather(firer.tick(now + 1), other.tick(now + 1), firer.tick(now + 1), other.tick(now + 1))
    finally:
        await other_client.close()

    assert sum(started) == 1
    assert await runs(db, schedule_id) == [1, 2]


async def test_a_buffered_run_is_never_overtaken_by_a_later_run(db, firer) -> None:
    """Two schedulers: one releases the buffered run 2 while the other, holding the schedule as
    read before (buffered run 2, previous run finished), decides the next due run 3. Run 3 must
    not start while run 2 waits (runs in order; the buffered one is never stranded behind it)."""
    now = int(time.time() * 1000)
    schedule_id = await interval_schedule(db, now, "buffer_one")
    assert await firer.tick(now) == 0
    stale = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert stale["buffered_run"]["number"] == 2
    await finish(db, stale["last_job_id"])

    other = ScheduleFirer(db, firer.publisher)
    assert await other.fire(stale, now + MINUTE) is None  # run 3 waits for the buffered run 2
    assert await runs(db, schedule_id) == [1]
    assert await firer.tick(now + MINUTE) == 1
    assert await runs(db, schedule_id) == [1, 2]


async def test_a_run_due_while_its_tenant_is_at_its_running_jobs_quota_is_skipped(db, firer) -> None:
    # The API refuses this tenant's submissions (429); allow_all would otherwise start a run on
    # every tick whatever the quota, and a suspended tenant's schedules would run on.
    now = int(time.time() * 1000)
    tenant = f"full{uuid.uuid4().hex[:6]}"
    schedule_id = await interval_schedule(db, now, "allow_all")
    await db[SCHEDULES].update_one({"_id": schedule_id}, {"$set": {"tenant": tenant}})
    await db[JOBS].update_many({"schedule_id": schedule_id}, {"$set": {"tenant": tenant}})  # its run 1, STARTED
    await db[TENANTS].insert_one({"_id": tenant, "quotas": {"max_running_jobs": 1}})

    assert await firer.tick(now) == 0
    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert (stored["skipped_runs"], stored["total_runs"]) == (1, 1) and await runs(db, schedule_id) == [1]

    await finish(db, stored["last_job_id"])
    assert await firer.tick(now + MINUTE) == 1  # room again: the next due run starts
    assert await runs(db, schedule_id) == [1, 2]
