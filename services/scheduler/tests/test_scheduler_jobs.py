"""JobScheduler against the MongoDB-wire server, with an in-memory recording dispatcher."""

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from cairn_contracts.messages import RunFrontier, RunShard, RunShards, ShardFinished, StartJob
from cairn_contracts.pipelines import PIPELINES
from cairn_contracts.sinks import RUN_MS, WINDOW, window_key
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, DEFAULT_TENANT, JOBS, MAIN_SUB_KEY, SHARDS
from cairn_contracts.tasks import shard_keys_of
from cairn_contracts.tenancy import tenant_database
from cairn_runtime.amqp import PublishNotConfirmed
from cairn_runtime.consumer import Unprocessable
from cairn_scheduler.jobs import JobScheduler


class RecordingDispatcher:
    """Records each dispatched task with the state its shard had at that moment; can fail once."""

    def __init__(self, db: Any, *, fail_on_call: int | None = None) -> None:
        self.db = db
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.dispatched: list[tuple[RunShard, int, str]] = []

    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise PublishNotConfirmed("the broker did not confirm")
        if isinstance(task, RunShard | RunShards):  # a bundle is recorded as the RunShard of each of its shards
            for key in shard_keys_of(task):
                shard = await self.db[SHARDS].find_one({"shard_key": key})
                self.dispatched.append((RunShard(job_id=task.job_id, shard_key=key), priority, shard["state"]))
        else:
            self.dispatched.append((task, priority, None))

    @property
    def keys(self) -> list[str]:
        return [task.shard_key for task, _, _ in self.dispatched]


def command(
    job_id: str, *, count: int = 100, shards: int = 4, priority: int = 2, start: int = 0, sharding: dict | None = None
) -> StartJob:
    return StartJob.model_validate(
        {
            "job_id": job_id,
            "tenant": "default",
            "spec": {
                "pipeline": "synthetic",
                "params": {"start": start, "count": count},
                "sharding": sharding or {"shards": shards},
                "priority": priority,
            },
        }
    )


async def record_job(db: Any, cmd: StartJob, *, state: JobState = JobState.PENDING) -> None:
    """The job document as the gateway records it."""
    await db[JOBS].insert_one(
        {
            "_id": cmd.job_id,
            "tenant": cmd.tenant,
            "name": cmd.spec.name,
            "pipeline": cmd.spec.pipeline,
            "priority": int(cmd.spec.priority),
            "spec": cmd.spec.model_dump(mode="json"),
            "state": state,
            "created_at": datetime.now(UTC),
            "command_published_at": datetime.now(UTC),
        }
    )


async def shard_states(db: Any, job_id: str) -> dict[str, str]:
    return {s["shard_key"]: s["state"] async for s in db[SHARDS].find({"job_id": job_id})}


async def test_start_job_records_shards_and_checkpoints_and_dispatches_each_once(db) -> None:
    cmd = command("job-a", count=10, shards=3, priority=3, start=5)
    await record_job(db, cmd)
    dispatcher = RecordingDispatcher(db)

    await JobScheduler(db, dispatcher).start_job(cmd)

    keys = ["job-a:0000", "job-a:0001", "job-a:0002"]
    shards = {s["_id"]: s async for s in db[SHARDS].find({"job_id": "job-a"})}
    assert sorted(shards) == keys
    assert [(shards[k]["range_start"], shards[k]["range_end"]) for k in keys] == [(5, 9), (9, 12), (12, 15)]
    assert all(s["shard_key"] == s["_id"] and s["attempts"] == 0 and s["fencing_token"] == 0 for s in shards.values())
    assert all(s["priority"] == 3 and s["strategy"] == "range" for s in shards.values())
    checkpoints = {c["shard_key"]: c async for c in db[CHECKPOINTS].find({"job_id": "job-a"})}
    assert sorted(checkpoints) == keys
    for key in keys:
        checkpoint = checkpoints[key]
        assert checkpoint["_id"] == f"{key}/{MAIN_SUB_KEY}" and checkpoint["sub_key"] == MAIN_SUB_KEY
        # No cursor yet (the pipeline's `start` gives it), its position at the range start.
        assert checkpoint["cursor"] is None
        assert checkpoint["position"] == checkpoint["range_start"] == shards[key]["range_start"]
        assert checkpoint["range_end"] == shards[key]["range_end"]
        assert checkpoint["records_done"] == 0 and checkpoint["fencing_token"] == 0
    job = await db[JOBS].find_one({"_id": "job-a"})
    assert job["state"] == JobState.STARTED
    assert job["records_total"] == 10 and job["shard_count"] == 3
    assert sorted(dispatcher.keys) == keys
    assert all(task.job_id == "job-a" and priority == 3 for task, priority, _ in dispatcher.dispatched)
    # published first, marked QUEUED only after the broker confirmed
    assert {state for _, _, state in dispatcher.dispatched} == {ShardState.PLANNED}
    assert set((await shard_states(db, "job-a")).values()) == {ShardState.QUEUED}


async def test_start_job_twice_creates_nothing_new_and_dispatches_nothing(db) -> None:
    cmd = command("job-b", count=40, shards=4)
    await record_job(db, cmd)
    dispatcher = RecordingDispatcher(db)
    scheduler = JobScheduler(db, dispatcher)
    await scheduler.start_job(cmd)
    first_shards = [s async for s in db[SHARDS].find({"job_id": "job-b"})]

    await scheduler.start_job(cmd)

    assert sorted(dispatcher.keys) == [f"job-b:{i:04d}" for i in range(4)]  # each once (in one bundle: bundles.py)
    assert [s async for s in db[SHARDS].find({"job_id": "job-b"})] == first_shards
    assert await db[CHECKPOINTS].count_documents({"job_id": "job-b"}) == 4
    assert (await db[JOBS].find_one({"_id": "job-b"}))["state"] == JobState.STARTED


async def test_small_shards_are_sent_in_bundles_of_about_one_batch_and_large_ones_alone(db) -> None:
    cmd = StartJob.model_validate({"job_id": "job-bundles", "tenant": "default", "spec": {
        "pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 40}, "batch_size": 100}})
    await record_job(db, cmd)
    dispatcher = BundleRecorder()
    await JobScheduler(db, dispatcher).start_job(cmd)

    # 40 shards of 25 records, batch_size 100: ten bundles of four, in index order.
    assert [t.shard_keys for t in dispatcher.tasks] == [[f"job-bundles:{i:04d}" for i in range(b, b + 4)] for b in range(0, 40, 4)]
    assert await db[SHARDS].count_documents({"job_id": "job-bundles", "state": ShardState.QUEUED}) == 40

    large = StartJob.model_validate({"job_id": "job-large", "tenant": "default", "spec": {
        "pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 4}, "batch_size": 100}})
    await record_job(db, large)
    dispatcher = BundleRecorder()
    await JobScheduler(db, dispatcher).start_job(large)
    assert [type(t) for t in dispatcher.tasks] == [RunShard] * 4  # 250 records each: more than a batch, a task each


class BundleRecorder:
    def __init__(self) -> None:
        self.tasks: list[Any] = []

    async def dispatch(self, task: Any, priority: int) -> None:
        self.tasks.append(task)


async def test_start_job_of_an_unknown_job_is_unprocessable(db) -> None:
    dispatcher = RecordingDispatcher(db)

    with pytest.raises(Unprocessable, match="job-missing"):
        await JobScheduler(db, dispatcher).start_job(command("job-missing"))

    assert dispatcher.calls == 0
    assert await db[SHARDS].count_documents({}) == 0


async def test_start_job_of_a_finished_job_is_ignored(db) -> None:
    cmd = command("job-done")
    await record_job(db, cmd, state=JobState.SUCCESS)
    dispatcher = RecordingDispatcher(db)

    await JobScheduler(db, dispatcher).start_job(cmd)

    assert dispatcher.calls == 0
    assert await db[SHARDS].count_documents({"job_id": "job-done"}) == 0
    assert (await db[JOBS].find_one({"_id": "job-done"}))["state"] == JobState.SUCCESS


async def test_failed_dispatch_leaves_every_shard_planned_and_a_redelivery_dispatches_them(db) -> None:
    # Bulk dispatch: the tasks are published, their confirms awaited together, then one
    # update_many marks the shards QUEUED. A dispatch that fails part-way marks none; the
    # redelivered command sends them all again (a shard sent twice is claimed once by a worker).
    cmd = command("job-c", count=40, shards=4)
    await record_job(db, cmd)
    failing = RecordingDispatcher(db, fail_on_call=2)

    with pytest.raises(PublishNotConfirmed):
        await JobScheduler(db, failing, max_bundle_shards=1).start_job(cmd)  # a task per shard: the second fails

    states = await shard_states(db, "job-c")
    assert len(failing.keys) == 1
    assert set(states.values()) == {ShardState.PLANNED}

    retry = RecordingDispatcher(db)
    await JobScheduler(db, retry).start_job(cmd)

    assert sorted(retry.keys) == sorted(states)
    assert set((await shard_states(db, "job-c")).values()) == {ShardState.QUEUED}
    assert await db[SHARDS].count_documents({"job_id": "job-c"}) == 4


async def set_shards(db: Any, job_id: str, states: list[ShardState], per_shard: dict[str, int] | None = None) -> None:
    keys = sorted(await shard_states(db, job_id))
    for key, state in zip(keys, states, strict=True):
        await db[SHARDS].update_one({"_id": key}, {"$set": {"state": state}})
        if per_shard:
            await db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": per_shard})


async def started_job(db: Any, job_id: str, shards: int = 3) -> JobScheduler:
    cmd = command(job_id, count=30, shards=shards)
    await record_job(db, cmd)
    scheduler = JobScheduler(db, RecordingDispatcher(db))
    await scheduler.start_job(cmd)
    return scheduler


async def test_roll_up_all_succeeded_is_success_with_totals_from_checkpoints(db) -> None:
    scheduler = await started_job(db, "job-d")
    await set_shards(
        db, "job-d", [ShardState.SUCCEEDED] * 3, {"records_done": 10, "records_written": 9, "records_redone": 1, "batches": 2}
    )

    assert await scheduler.roll_up("job-d") is JobState.SUCCESS

    job = await db[JOBS].find_one({"_id": "job-d"})
    assert job["state"] == JobState.SUCCESS
    assert job["finished_at"] is not None
    assert job["result"] == {
        "records_done": 30,
        "records_written": 27,
        "records_redone": 3,
        "records_inserted": 0,
        "records_updated": 0,
        "records_unchanged": 0,
        "records_duplicate": 0,
        "batches": 6,
        "shards_succeeded": 3,
        "shards_failed": 0,
        "shards_cancelled": 0,
        "failed_shards": [],
    }
    assert job["shard_states"] == {ShardState.SUCCEEDED: 3}


async def test_roll_up_sums_the_sinks_write_counters(db) -> None:
    scheduler = await started_job(db, "job-counts")
    counts = {"records_inserted": 4, "records_updated": 3, "records_unchanged": 2, "records_duplicate": 1}
    await set_shards(db, "job-counts", [ShardState.SUCCEEDED] * 3, counts)

    assert await scheduler.roll_up("job-counts") is JobState.SUCCESS

    result = (await db[JOBS].find_one({"_id": "job-counts"}))["result"]
    assert {name: result[name] for name in counts} == {name: 3 * value for name, value in counts.items()}
    assert "records_deleted" not in result  # not a replace_window job


async def replace_window_job(db: Any, job_id: str, *, run_ms: int) -> tuple[JobScheduler, str]:
    cmd = command(job_id, count=30, shards=2)
    cmd = cmd.model_copy(update={"spec": cmd.spec.model_copy(update={"write_mode": "replace_window"})})
    await record_job(db, cmd)
    await db[JOBS].update_one({"_id": job_id}, {"$set": {"created_at_ms": run_ms}})
    scheduler = JobScheduler(db, RecordingDispatcher(db))
    await scheduler.start_job(cmd)
    return scheduler, window_key(cmd.spec.model_dump(mode="json"))


def tenant_records(db: Any) -> Any:
    """The `records` collection of the default tenant's namespace, where its jobs store records."""
    return db.client[tenant_database(db.name, DEFAULT_TENANT)]["records"]


@pytest.fixture(autouse=True)
async def drop_namespace(db):
    yield
    await db.client.drop_database(tenant_database(db.name, DEFAULT_TENANT))


async def seed_window(db: Any, window: str) -> None:
    await tenant_records(db).insert_many(
        [
            {"_id": "stale-1", WINDOW: window, RUN_MS: 1_000},
            {"_id": "stale-2", WINDOW: window, RUN_MS: 1_999},
            {"_id": "seen", WINDOW: window, RUN_MS: 2_000},
            {"_id": "newer-run", WINDOW: window, RUN_MS: 3_000},
            {"_id": "other-window", WINDOW: "other", RUN_MS: 1_000},
            {"_id": "no-window"},
        ]
    )


async def test_a_replace_window_job_deletes_its_windows_stale_records_before_it_succeeds(db) -> None:
    scheduler, window = await replace_window_job(db, "job-w", run_ms=2_000)
    await seed_window(db, window)
    await db["records"].insert_one({"_id": "stale-1", WINDOW: window, RUN_MS: 1_000})  # not the tenant's namespace
    await set_shards(db, "job-w", [ShardState.SUCCEEDED] * 2)

    assert await scheduler.roll_up("job-w") is JobState.SUCCESS

    assert sorted([d["_id"] async for d in tenant_records(db).find()]) == ["newer-run", "no-window", "other-window", "seen"]
    assert await db["records"].count_documents({}) == 1  # the delete reached the tenant's records only
    job = await db[JOBS].find_one({"_id": "job-w"})
    assert job["result"]["records_deleted"] == job["records_deleted"] == 2


async def test_concurrent_roll_ups_of_a_replace_window_job_count_every_delete_once(db) -> None:
    scheduler, window = await replace_window_job(db, "job-wc", run_ms=2_000)
    await seed_window(db, window)
    await set_shards(db, "job-wc", [ShardState.SUCCEEDED] * 2)

    await asyncio.gather(*(scheduler.roll_up("job-wc") for _ in range(4)))

    job = await db[JOBS].find_one({"_id": "job-wc"})
    assert job["state"] == JobState.SUCCESS
    assert job["records_deleted"] == 2  # whichever roll-up deleted, the total counts each record once
    assert await tenant_records(db).count_documents({}) == 4


async def test_a_failed_replace_window_job_deletes_nothing(db) -> None:
    scheduler, window = await replace_window_job(db, "job-wf", run_ms=2_000)
    await seed_window(db, window)
    await set_shards(db, "job-wf", [ShardState.SUCCEEDED, ShardState.FAILED])

    assert await scheduler.roll_up("job-wf") is JobState.FAILURE

    assert await tenant_records(db).count_documents({}) == 6


async def test_roll_up_one_failed_is_failure_naming_the_failed_shard(db) -> None:
    scheduler = await started_job(db, "job-e")
    await set_shards(db, "job-e", [ShardState.SUCCEEDED, ShardState.FAILED, ShardState.SUCCEEDED])

    assert await scheduler.roll_up("job-e") is JobState.FAILURE

    job = await db[JOBS].find_one({"_id": "job-e"})
    assert job["state"] == JobState.FAILURE
    assert job["result"]["failed_shards"] == ["job-e:0001"]
    assert job["result"]["shards_failed"] == 1 and job["result"]["shards_succeeded"] == 2


async def test_roll_up_of_running_shards_keeps_the_job_open(db) -> None:
    scheduler = await started_job(db, "job-f")
    await set_shards(db, "job-f", [ShardState.SUCCEEDED, ShardState.RETRY, ShardState.RUNNING])

    assert await scheduler.roll_up("job-f") is JobState.RETRY

    job = await db[JOBS].find_one({"_id": "job-f"})
    assert job["state"] == JobState.RETRY
    assert "result" not in job
    assert job["shard_states"] == {ShardState.SUCCEEDED: 1, ShardState.RETRY: 1, ShardState.RUNNING: 1}


async def test_a_terminal_job_is_never_changed_again(db) -> None:
    scheduler = await started_job(db, "job-g")
    await set_shards(db, "job-g", [ShardState.SUCCEEDED] * 3)
    await scheduler.roll_up("job-g")
    before = await db[JOBS].find_one({"_id": "job-g"})

    await set_shards(db, "job-g", [ShardState.FAILED] * 3)
    assert await scheduler.roll_up("job-g") is None
    await scheduler.shard_finished(ShardFinished(job_id="job-g", shard_key="job-g:0000", outcome="failed", records_done=0))
    await scheduler.start_job(command("job-g", count=30, shards=3))

    assert await db[JOBS].find_one({"_id": "job-g"}) == before


async def test_roll_up_of_a_pending_or_unknown_job_does_nothing(db) -> None:
    cmd = command("job-h")
    await record_job(db, cmd)
    scheduler = JobScheduler(db, RecordingDispatcher(db))

    assert await scheduler.roll_up("job-h") is None
    assert await scheduler.roll_up("job-nobody") is None
    assert (await db[JOBS].find_one({"_id": "job-h"}))["state"] == JobState.PENDING


async def test_shard_finished_rolls_the_job_up(db) -> None:
    scheduler = await started_job(db, "job-i", shards=2)
    await set_shards(db, "job-i", [ShardState.SUCCEEDED, ShardState.SUCCEEDED])

    # Each event counts its own shard (a shard whose event is lost is counted by the periodic roll_up).
    await scheduler.shard_finished(ShardFinished(job_id="job-i", shard_key="job-i:0001", outcome="succeeded", records_done=15))
    assert (await db[JOBS].find_one({"_id": "job-i"}))["state"] == JobState.STARTED
    await scheduler.shard_finished(ShardFinished(job_id="job-i", shard_key="job-i:0000", outcome="succeeded", records_done=15))

    assert (await db[JOBS].find_one({"_id": "job-i"}))["state"] == JobState.SUCCESS


async def test_hash_mod_job_records_one_bucket_per_shard_over_the_whole_range(db) -> None:
    cmd = command("job-hm", count=90, start=10, sharding={"strategy": "hash_mod", "shards": 3})
    await record_job(db, cmd)
    dispatcher = RecordingDispatcher(db)

    await JobScheduler(db, dispatcher).start_job(cmd)

    shards = [s async for s in db[SHARDS].find({"job_id": "job-hm"}).sort("index", 1)]
    assert [(s["range_start"], s["range_end"]) for s in shards] == [(10, 100)] * 3
    assert [s["bucket"] for s in shards] == [{"modulus": 3, "remainder": r} for r in range(3)]
    assert all(s["strategy"] == "hash_mod" for s in shards)
    assert await db[CHECKPOINTS].count_documents({"job_id": "job-hm"}) == 3
    job = await db[JOBS].find_one({"_id": "job-hm"})
    assert (job["records_total"], job["shard_count"]) == (90, 3)
    assert sorted(dispatcher.keys) == ["job-hm:0000", "job-hm:0001", "job-hm:0002"]


async def test_lease_frontier_job_records_items_and_dispatches_its_runners_once(db) -> None:
    cmd = command("job-lf", count=100, sharding={"strategy": "lease_frontier", "shards": 2, "item_size": 10})
    await record_job(db, cmd)
    dispatcher = RecordingDispatcher(db)
    scheduler = JobScheduler(db, dispatcher)

    await scheduler.start_job(cmd)
    await scheduler.start_job(cmd)  # a redelivered command

    assert await db[SHARDS].count_documents({"job_id": "job-lf"}) == 10
    assert await db[CHECKPOINTS].count_documents({"job_id": "job-lf"}) == 10
    # the items wait in MongoDB for the runners to claim them
    assert set((await shard_states(db, "job-lf")).values()) == {ShardState.PLANNED}
    assert [(task, priority) for task, priority, _ in dispatcher.dispatched] == [
        (RunFrontier(job_id="job-lf", lane=0), 2),
        (RunFrontier(job_id="job-lf", lane=1), 2),
    ]
    job = await db[JOBS].find_one({"_id": "job-lf"})
    assert (job["state"], job["shard_count"], job["records_total"]) == (JobState.STARTED, 10, 100)


async def test_a_job_is_planned_over_the_space_the_gateway_recorded(db) -> None:
    cmd = command("job-space", count=10, shards=2)
    await record_job(db, cmd)
    # The gateway copies the resolved work space (here: a time window in epoch ms) into the job.
    await db[JOBS].update_one({"_id": "job-space"}, {"$set": {"space": {"kind": "time_range", "start": 1_000, "end": 61_000}}})

    await JobScheduler(db, RecordingDispatcher(db)).start_job(cmd)

    shards = [s async for s in db[SHARDS].find({"job_id": "job-space"}).sort("index", 1)]
    assert [(s["range_start"], s["range_end"]) for s in shards] == [(1_000, 31_000), (31_000, 61_000)]
    job = await db[JOBS].find_one({"_id": "job-space"})
    assert job["records_total"] is None  # a time window says nothing of how many records it holds


async def test_planned_shards_and_checkpoints_carry_the_submission_of_their_job(db) -> None:
    # A job deleted and submitted again keeps its id (and shard keys): the stamp tells them apart.
    cmd = command("job-stamp", count=10, shards=2)
    await record_job(db, cmd)
    await db[JOBS].update_one({"_id": "job-stamp"}, {"$set": {"created_at_ms": 1_764_000_000_123}})  # as the gateway records it

    await JobScheduler(db, RecordingDispatcher(db)).start_job(cmd)

    stamps = [s.get("job_created_at_ms") async for s in db[SHARDS].find({"job_id": "job-stamp"})]
    stamps += [c.get("job_created_at_ms") async for c in db[CHECKPOINTS].find({"job_id": "job-stamp"})]
    assert stamps == [1_764_000_000_123] * 4


async def test_checkpoints_an_earlier_scheduler_recorded_before_it_stopped_get_the_stamp_on_redelivery(db) -> None:
    # An earlier version recorded a chunk's checkpoints (no stamp) and stopped before its shards.
    cmd = command("job-upgrade", count=10, shards=2)
    await record_job(db, cmd)
    await db[JOBS].update_one({"_id": "job-upgrade"}, {"$set": {"created_at_ms": 1_764_000_000_456}})
    await db[CHECKPOINTS].insert_many(
        [{"_id": f"job-upgrade:{i:04d}/{MAIN_SUB_KEY}", "shard_key": f"job-upgrade:{i:04d}", "sub_key": MAIN_SUB_KEY,
          "job_id": "job-upgrade", "cursor": None, "batches": 0, "fencing_token": 0} for i in range(2)]
    )

    await JobScheduler(db, RecordingDispatcher(db)).start_job(cmd)  # the redelivered StartJob

    stamps = [c.get("job_created_at_ms") async for c in db[CHECKPOINTS].find({"job_id": "job-upgrade"})]
    assert stamps == [1_764_000_000_456] * 2  # so the stamped shards' claims match them


async def test_a_job_recorded_without_a_space_is_planned_from_the_catalog(db) -> None:
    cmd = command("job-sched", count=10, shards=2, start=5)
    await record_job(db, cmd)  # as a schedule's run records it: no space

    await JobScheduler(db, RecordingDispatcher(db)).start_job(cmd)

    job = await db[JOBS].find_one({"_id": "job-sched"})
    assert (job["space"]["kind"], job["space"]["start"], job["space"]["end"], job["records_total"]) == ("key_range", 5, 15, 10)
    assert job["pipeline_version"] == "2"


async def test_a_job_whose_catalog_entry_is_broken_is_unprocessable(db) -> None:
    cmd = command("job-broken", count=10, shards=2)
    await record_job(db, cmd)  # as a schedule's run records it: no space
    # A worker (or anything writing the catalog) left a document that is no catalog entry.
    await db[PIPELINES].update_one({"_id": "synthetic"}, {"$set": {"params_schema_json": "{not json"}})

    with pytest.raises(Unprocessable, match="job-broken"):
        await JobScheduler(db, RecordingDispatcher(db)).start_job(cmd)
