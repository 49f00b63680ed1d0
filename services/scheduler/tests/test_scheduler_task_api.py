"""The scheduler's task-API duties against the MongoDB-wire server, RabbitMQ and Redis: cancel
(stop shards, roll up CANCELLED, release the job lock), the sweep, result expiry, schedule firing."""

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from cairn_contracts.messages import CancelJob, StartJob
from cairn_contracts.schedules import ScheduleTiming
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOB_LOCK_KEY, JOBS, SCHEDULES, SHARDS, JobRecord
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS
from cairn_runtime.consumer import Unprocessable
from cairn_scheduler.cancel import Canceller
from cairn_scheduler.jobs import JobScheduler, job_state_from
from cairn_scheduler.locks import JobLockRelease
from cairn_scheduler.schedules import RECOVER_AFTER_MS, ScheduleFirer
from cairn_testkit.aio import drain


class RecordingDispatcher:
    """Records the tasks the scheduler dispatches (the broker's own dispatch has its tests)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.dispatched: list[Any] = []

    async def dispatch(self, task: Any, priority: int) -> None:
        self.dispatched.append((task, priority))

SPEC = {"pipeline": "synthetic", "params": {"count": 40}, "sharding": {"shards": 4}, "priority": 3}


@pytest.fixture
def redis_client(async_redis: aioredis.Redis) -> aioredis.Redis:
    return async_redis


@pytest.fixture
def lock_prefix(redis_prefix_of_test: str) -> str:
    return redis_prefix_of_test


@pytest.fixture
def locks(redis_client, lock_prefix) -> JobLockRelease:
    return JobLockRelease(redis_client, lock_prefix)


async def recorded(db, tenant: str = "acme", **spec_changes) -> JobRecord:
    record = JobRecord.new({**SPEC, **spec_changes}, tenant)
    await db[JOBS].insert_one(record.to_document())
    return record


async def started(db, locks=None) -> tuple[JobScheduler, JobRecord, RecordingDispatcher]:
    record = await recorded(db)
    dispatcher = RecordingDispatcher(db)
    scheduler = JobScheduler(db, dispatcher, locks=locks)
    await scheduler.start_job(StartJob(job_id=record.id, tenant=record.tenant, spec=record.job_spec()))
    return scheduler, record, dispatcher


async def shard_states(db, job_id: str) -> list[str]:
    return [s["state"] async for s in db[SHARDS].find({"job_id": job_id}).sort("index", 1)]


async def request_cancel(db, job_id: str) -> None:
    await db[JOBS].update_one({"_id": job_id}, {"$set": {"cancel_requested": True}})


# --- cancel --------------------------------------------------------------------------------------
def test_roll_up_all_terminal_with_a_cancelled_shard_is_cancelled() -> None:
    assert job_state_from(Counter({ShardState.SUCCEEDED: 2, ShardState.CANCELLED: 2}), 4) == JobState.CANCELLED
    assert job_state_from(Counter({ShardState.FAILED: 1, ShardState.CANCELLED: 3}), 4) == JobState.CANCELLED
    assert job_state_from(Counter({ShardState.RUNNING: 1, ShardState.CANCELLED: 3}), 4) == JobState.STARTED
    assert job_state_from(Counter({ShardState.SUCCEEDED: 4}), 4) == JobState.SUCCESS


async def test_stop_cancels_waiting_shards_and_marks_running_ones(db, locks, redis_client, lock_prefix) -> None:
    scheduler, record, _ = await started(db, locks)
    keys = [s["_id"] async for s in db[SHARDS].find({"job_id": record.id}).sort("index", 1)]
    await db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"state": ShardState.RUNNING}})
    await db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"state": ShardState.SUCCEEDED}})
    await db[SHARDS].update_one({"_id": keys[2]}, {"$set": {"state": ShardState.RETRY}})
    lock_key = JOB_LOCK_KEY.format(prefix=lock_prefix, tenant="acme", fingerprint=record.spec_fingerprint)
    await redis_client.set(lock_key, record.id)
    await request_cancel(db, record.id)

    state = await scheduler.stop(record.id)

    assert state == JobState.STARTED  # the running shard has not stopped yet
    assert await shard_states(db, record.id) == [ShardState.RUNNING, ShardState.SUCCEEDED, ShardState.CANCELLED, ShardState.CANCELLED]
    assert await db[SHARDS].count_documents({"job_id": record.id, "cancel_requested": True}) == 4
    assert await db[CHECKPOINTS].count_documents({"job_id": record.id, "cancel_requested": True}) == 4
    assert await redis_client.get(lock_key) is not None

    await db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"state": ShardState.CANCELLED}})  # the worker stopped it
    assert await scheduler.roll_up(record.id) == JobState.CANCELLED

    job = await db[JOBS].find_one({"_id": record.id})
    assert job["state"] == JobState.CANCELLED and isinstance(job["finished_at_ms"], int)
    assert job["result"]["shards_cancelled"] == 3 and job["result"]["shards_succeeded"] == 1
    assert await redis_client.get(lock_key) is None  # released with the job's end


async def test_the_lock_is_released_only_if_it_still_names_the_job(db, locks, redis_client, lock_prefix) -> None:
    record = await recorded(db)
    lock_key = JOB_LOCK_KEY.format(prefix=lock_prefix, tenant="acme", fingerprint=record.spec_fingerprint)
    await redis_client.set(lock_key, "another-job")

    assert await locks.release_job({"_id": record.id, "tenant": "acme", "spec_fingerprint": record.spec_fingerprint}) is False

    assert (await redis_client.get(lock_key)) == b"another-job"


async def test_a_job_cancelled_before_planning_is_never_planned(db, locks) -> None:
    record = await recorded(db)
    await request_cancel(db, record.id)
    dispatcher = RecordingDispatcher(db)

    await JobScheduler(db, dispatcher, locks=locks).start_job(StartJob(job_id=record.id, tenant="acme", spec=record.job_spec()))

    assert dispatcher.dispatched == []
    assert await db[SHARDS].count_documents({"job_id": record.id}) == 0
    job = await db[JOBS].find_one({"_id": record.id})
    assert job["state"] == JobState.CANCELLED and job["result"]["records_done"] == 0


async def test_a_cancel_that_arrives_while_planning_dispatches_nothing(db) -> None:
    record = await recorded(db)

    dispatcher = RecordingDispatcher(db)
    scheduler = JobScheduler(db, dispatcher)
    original_record = scheduler._record_shards

    async def record_then_cancel(*args: Any) -> None:
        await original_record(*args)
        await request_cancel(db, record.id)  # the gateway marks the job between insert and dispatch

    object.__setattr__(scheduler, "_record_shards", record_then_cancel)
    await scheduler.start_job(StartJob(job_id=record.id, tenant="acme", spec=record.job_spec()))

    assert dispatcher.dispatched == []
    assert set(await shard_states(db, record.id)) == {ShardState.CANCELLED}
    assert (await db[JOBS].find_one({"_id": record.id}))["state"] == JobState.CANCELLED


async def test_cancel_command_of_an_unknown_job_is_unprocessable_and_of_a_finished_one_ignored(db) -> None:
    scheduler, record, _ = await started(db)
    canceller = Canceller(scheduler, result_ttl_s=3600)
    with pytest.raises(Unprocessable):
        await canceller.handle(CancelJob(job_id="nope", tenant="acme"))
    with pytest.raises(Unprocessable):
        await canceller.handle(CancelJob(job_id=record.id, tenant="globex"))  # not that tenant's job
    await db[SHARDS].update_many({"job_id": record.id}, {"$set": {"state": ShardState.SUCCEEDED}})
    await scheduler.roll_up(record.id)

    await canceller.handle(CancelJob(job_id=record.id, tenant="acme"))

    assert (await db[JOBS].find_one({"_id": record.id}))["state"] == JobState.SUCCESS


async def test_a_cancel_of_a_deleted_submission_delivered_late_leaves_the_new_one_of_the_same_id_alone(db) -> None:
    """Every sender marks the job before it publishes CancelJob. A job deleted and submitted again
    under the same id is not marked: a CancelJob of the deleted submission, delivered late,
    changes nothing; once the new one is cancelled (marked), the command stops it."""
    scheduler, record, _ = await started(db)
    canceller = Canceller(scheduler, result_ttl_s=3600)

    await canceller.handle(CancelJob(job_id=record.id, tenant="acme"))

    job = await db[JOBS].find_one({"_id": record.id})
    assert not job.get("cancel_requested") and job["state"] == JobState.STARTED
    assert ShardState.CANCELLED not in await shard_states(db, record.id)

    await request_cancel(db, record.id)
    await canceller.handle(CancelJob(job_id=record.id, tenant="acme"))

    assert (await db[JOBS].find_one({"_id": record.id}))["state"] == JobState.CANCELLED


async def test_the_sweep_cancels_what_a_lost_command_left_and_shards_back_from_a_retry(db) -> None:
    scheduler, record, _ = await started(db)
    await request_cancel(db, record.id)  # marked, but the command never came
    canceller = Canceller(scheduler, result_ttl_s=3600)

    assert await canceller.sweep() == 1
    assert (await db[JOBS].find_one({"_id": record.id}))["state"] == JobState.CANCELLED
    assert await canceller.sweep() == 0


async def test_results_past_their_ttl_are_dropped(db) -> None:
    scheduler, record, _ = await started(db)
    fresh = await recorded(db, name="fresh")
    old_ms = int(time.time() * 1000) - 7200_000
    await db[JOBS].update_one({"_id": record.id}, {"$set": {"state": JobState.SUCCESS, "finished_at_ms": old_ms, "result": {"x": 1}}})
    await db[JOBS].update_one({"_id": fresh.id}, {"$set": {"state": JobState.SUCCESS, "finished_at_ms": old_ms + 7000_000, "result": {"x": 2}}})

    assert await Canceller(scheduler, result_ttl_s=3600).expire_results() == 1

    assert "result" not in await db[JOBS].find_one({"_id": record.id})
    assert (await db[JOBS].find_one({"_id": fresh.id}))["result"] == {"x": 2}


# --- schedules -----------------------------------------------------------------------------------
async def schedule(db, *, now_ms: int, due_ms: int, timing: dict, total_runs: int = 0, tenant: str = "acme") -> str:
    parsed = ScheduleTiming.model_validate(timing)
    schedule_id = uuid.uuid4().hex
    await db[SCHEDULES].insert_one(
        {
            "_id": schedule_id, "tenant": tenant, "name": "s", "job": SPEC, "paused": False,
            **parsed.timing_fields(), "anchor_ms": due_ms, "next_run_at_ms": due_ms, "total_runs": total_runs,
            "manual_runs": 0, "created_at_ms": now_ms,
        }
    )
    return schedule_id


@pytest.fixture
async def firer(db, broker):
    await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    return ScheduleFirer(db, broker.publisher)


async def test_a_due_run_creates_its_job_and_publishes_it(db, firer, broker) -> None:
    now = int(time.time() * 1000)
    schedule_id = await schedule(db, now_ms=now, due_ms=now - 10, timing={"kind": "interval", "interval_s": 60})

    assert await firer.tick(now) == 1

    job = await db[JOBS].find_one({"schedule_id": schedule_id})
    assert (job["idempotency_key"], job["schedule_run"], job["tenant"]) == (f"schedule:{schedule_id}:1", 1, "acme")
    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert (stored["total_runs"], stored["last_job_id"], stored["next_run_at_ms"]) == (1, job["_id"], now - 10 + 60_000)
    assert "pending_run" not in stored
    published = [StartJob.model_validate_json(m.body) for m in await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])]
    assert [c.job_id for c in published] == [job["_id"]]
    assert await firer.tick(now) == 0  # not due any more


async def test_two_schedulers_fire_a_due_run_exactly_once(db, test_env, broker, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await schedule(db, now_ms=now, due_ms=now - 10, timing={"kind": "interval", "interval_s": 60})
    other_client = AsyncMongoClient(test_env.mongodb_uri, tz_aware=True)
    try:
        other = ScheduleFirer(other_client[db.name], broker.publisher)
        fired = await asyncio.gather(firer.tick(now), other.tick(now), firer.tick(now), other.tick(now))
    finally:
        await other_client.close()

    assert sum(fired) == 1
    assert await db[JOBS].count_documents({"schedule_id": schedule_id}) == 1
    assert (await db[SCHEDULES].find_one({"_id": schedule_id}))["total_runs"] == 1


async def test_a_scheduler_back_after_downtime_fires_the_missed_run_once(db, firer) -> None:
    now = int(time.time() * 1000)
    hour_ago = now - 3600_000
    schedule_id = await schedule(db, now_ms=hour_ago, due_ms=hour_ago, timing={"kind": "cron", "cron": "* * * * *"})

    assert await firer.tick(now) == 1
    assert await firer.tick(now) == 0

    assert await db[JOBS].count_documents({"schedule_id": schedule_id}) == 1  # not 60
    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert now < stored["next_run_at_ms"] <= now + 60_000


async def test_max_runs_ends_a_schedule(db, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await schedule(db, now_ms=now, due_ms=now - 10, timing={"kind": "interval", "interval_s": 1, "max_runs": 2}, total_runs=1)

    assert await firer.tick(now) == 1

    stored = await db[SCHEDULES].find_one({"_id": schedule_id})
    assert stored["total_runs"] == 2 and stored["next_run_at_ms"] is None
    assert await firer.tick(now + 10_000) == 0


async def test_a_paused_schedule_does_not_fire(db, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await schedule(db, now_ms=now, due_ms=now - 10, timing={"kind": "interval", "interval_s": 60})
    await db[SCHEDULES].update_one({"_id": schedule_id}, {"$set": {"paused": True}})

    assert await firer.tick(now) == 0
    assert await db[JOBS].count_documents({"schedule_id": schedule_id}) == 0


async def test_a_run_claimed_by_a_scheduler_that_died_is_created_once_later(db, firer) -> None:
    now = int(time.time() * 1000)
    schedule_id = await schedule(db, now_ms=now, due_ms=now + 60_000, timing={"kind": "interval", "interval_s": 60}, total_runs=1)
    await db[SCHEDULES].update_one({"_id": schedule_id}, {"$set": {"pending_run": {"number": 1, "due_ms": now - 1000, "claimed_at_ms": now - RECOVER_AFTER_MS - 1}}})

    await firer.tick(now)
    await firer.tick(now)

    jobs = [j async for j in db[JOBS].find({"schedule_id": schedule_id})]
    assert [j["idempotency_key"] for j in jobs] == [f"schedule:{schedule_id}:1"]
    assert "pending_run" not in await db[SCHEDULES].find_one({"_id": schedule_id})
