"""Issue 14: a job's counters are kept shard by shard and are exact: each terminal shard is added
once whatever the deliveries (duplicates, concurrent handlers, a SIGKILL mid-way, a lost event),
and the roll-up that follows an event reads one job document, not the job's shards."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from cairn_contracts.messages import RunFrontier, RunShard, ShardFinished, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOB_TALLIES, JOBS, SHARDS
from cairn_runtime import tally
from cairn_scheduler.jobs import JobScheduler


class Dispatcher:
    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        pass


async def started_job(db: Any, job_id: str, shards: int, count: int | None = None) -> JobScheduler:
    cmd = StartJob.model_validate(
        {
            "job_id": job_id,
            "tenant": "default",
            "spec": {"pipeline": "synthetic", "params": {"count": count or shards * 10}, "sharding": {"shards": shards}},
        }
    )
    await db[JOBS].insert_one(
        {
            "_id": job_id, "tenant": "default", "name": None, "pipeline": "synthetic", "priority": 2,
            "spec": cmd.spec.model_dump(mode="json"), "state": JobState.PENDING, "created_at": datetime.now(UTC),
        }
    )
    scheduler = JobScheduler(db, Dispatcher())
    await scheduler.start_job(cmd)
    return scheduler


async def finish(db: Any, job_id: str, index: int, state: ShardState, done: int, batches: int = 1) -> str:
    """What a worker leaves behind when a shard ends: the checkpoint's totals, the shard's state."""
    key = f"{job_id}:{index:04d}"
    await db[CHECKPOINTS].update_one(
        {"_id": f"{key}/main"}, {"$set": {
            "records_done": done, "records_written": done - 1, "records_redone": 1, "batches": batches,
            "records_inserted": done - 1, "records_duplicate": 1,  # the sink's counters (an insert job)
        }}
    )
    await db[SHARDS].update_one({"_id": key}, {"$set": {"state": state}})
    return key


def event(job_id: str, key: str, outcome: str = "succeeded") -> ShardFinished:
    return ShardFinished(job_id=job_id, shard_key=key, outcome=outcome, records_done=0)



# Shards 0-4 SUCCEEDED with 10 + i records done in 2 batches, shard 5 FAILED with 3 (`finish`),
# counted into their job: what its counters must say.
FIVE_SUCCEEDED_ONE_FAILED = {
    "shards_succeeded": 5, "shards_failed": 1, "shards_cancelled": 0,
    "records_done": sum(10 + i for i in range(5)) + 3,
    "records_written": sum(9 + i for i in range(5)) + 2,
    "records_redone": 6,
    "records_inserted": sum(9 + i for i in range(5)) + 2,
    "records_updated": 0,
    "records_unchanged": 0,
    "records_duplicate": 6,
    "batches": 11,
    "weight_done": 50,  # the failed shard's work is not done
}

async def counts(db: Any, job_id: str) -> dict[str, int]:
    return tally.counts_of(await db[JOBS].find_one({"_id": job_id}))


async def test_duplicate_and_concurrent_deliveries_count_each_shard_once(db) -> None:
    scheduler = await started_job(db, "dup", shards=6)
    keys = [await finish(db, "dup", i, ShardState.SUCCEEDED, done=10 + i, batches=2) for i in range(5)]
    keys.append(await finish(db, "dup", 5, ShardState.FAILED, done=3))

    # Every event three times, the copies handled concurrently (a redelivery racing the original,
    # two schedulers), in shuffled order.
    deliveries = [event("dup", k, "failed" if k.endswith("5") else "succeeded") for k in keys * 3]
    deliveries.reverse()
    await asyncio.gather(*(scheduler.shard_finished(e) for e in deliveries))
    await scheduler.roll_up("dup")  # the periodic pass on top: nothing to add

    job = await db[JOBS].find_one({"_id": "dup"})
    assert job["state"] == JobState.FAILURE
    assert await counts(db, "dup") == FIVE_SUCCEEDED_ONE_FAILED
    assert job["result"]["records_done"] == 63 and job["result"]["failed_shards"] == ["dup:0005"]
    assert job["result"]["shards_succeeded"] == 5 and job["result"]["shards_failed"] == 1


async def test_a_shard_whose_event_is_lost_is_counted_by_the_periodic_roll_up_once(db) -> None:
    # The crash between a shard's own update and its job's counting: the worker marked the shard
    # SUCCEEDED and died before its ShardFinished went out (or the scheduler died before counting).
    scheduler = await started_job(db, "lost", shards=3)
    for i in range(3):
        await finish(db, "lost", i, ShardState.SUCCEEDED, done=10)
    await scheduler.shard_finished(event("lost", "lost:0000"))
    await scheduler.shard_finished(event("lost", "lost:0001"))
    assert (await db[JOBS].find_one({"_id": "lost"}))["state"] == JobState.STARTED
    assert (await counts(db, "lost"))["shards_succeeded"] == 2

    assert await scheduler.roll_up("lost") == JobState.SUCCESS  # the maintenance pass repairs it
    await scheduler.shard_finished(event("lost", "lost:0002"))  # the event arrives late after all

    assert (await counts(db, "lost"))["shards_succeeded"] == 3
    assert (await db[JOBS].find_one({"_id": "lost"}))["result"]["records_done"] == 30


async def test_a_replayed_shard_is_taken_out_and_counted_again_with_its_new_end(db) -> None:
    scheduler = await started_job(db, "replayed", shards=2)
    await finish(db, "replayed", 0, ShardState.SUCCEEDED, done=10)
    await scheduler.shard_finished(event("replayed", "replayed:0000"))
    await finish(db, "replayed", 1, ShardState.FAILED, done=4)
    await tally.count_shard(db, "replayed:0001")
    assert (await counts(db, "replayed"))["shards_failed"] == 1

    # A DLQ replay reopens the shard (the replay handler then calls count_shard): out of the counters.
    await db[SHARDS].update_one({"_id": "replayed:0001"}, {"$set": {"state": ShardState.QUEUED}})
    assert await tally.count_shard(db, "replayed:0001") is True
    assert await tally.count_shard(db, "replayed:0001") is False  # idempotent
    taken_out = await counts(db, "replayed")
    assert (taken_out["shards_failed"], taken_out["records_done"]) == (0, 10)

    await finish(db, "replayed", 1, ShardState.SUCCEEDED, done=10)
    await scheduler.shard_finished(event("replayed", "replayed:0001"))

    job = await db[JOBS].find_one({"_id": "replayed"})
    assert job["state"] == JobState.SUCCESS
    assert (job["result"]["records_done"], job["result"]["shards_succeeded"], job["result"]["shards_failed"]) == (20, 2, 0)


_COUNTER = textwrap.dedent(
    """
    import asyncio, sys
    from pymongo import AsyncMongoClient
    from cairn_runtime import tally

    async def main(uri, name, job_id, shards):
        db = AsyncMongoClient(uri)[name]
        for i in range(int(shards)):
            await tally.count_shard(db, f"{job_id}:{i:04d}")
            print(i, flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_counters_stay_exact_when_the_counting_process_is_killed_mid_way(db, test_env) -> None:
    shards = 260  # three ledger buckets
    scheduler = await started_job(db, "killed", shards=shards, count=shards * 10)
    for i in range(shards):
        await finish(db, "killed", i, ShardState.SUCCEEDED, done=10)
    counter = subprocess.Popen(
        [sys.executable, "-c", _COUNTER, test_env.mongodb_uri, db.name, "killed", str(shards)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert counter.stdout is not None
        deadline = time.monotonic() + 120
        while int(counter.stdout.readline() or -1) < shards // 3:  # well inside the loop, mid-write or not
            assert time.monotonic() < deadline and counter.poll() is None
        os.kill(counter.pid, signal.SIGKILL)
    finally:
        counter.kill()
        counter.wait(timeout=30)
    partial = await counts(db, "killed")
    assert shards // 3 <= partial["shards_succeeded"] < shards
    assert partial["records_done"] == 10 * partial["shards_succeeded"]  # entry and figures moved together

    for i in range(shards):  # the redelivered events, in full
        await scheduler.shard_finished(event("killed", f"killed:{i:04d}"))

    assert (await counts(db, "killed"))["shards_succeeded"] == shards
    job = await db[JOBS].find_one({"_id": "killed"})
    assert job["state"] == JobState.SUCCESS and job["result"]["records_done"] == shards * 10


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.filters: list[tuple[str, dict]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        self.seen.append((event.command_name, collection if isinstance(collection, str) else ""))
        if isinstance(collection, str):
            self.filters.append((collection, dict(event.command.get("filter") or event.command.get("query") or {})))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_shard_event_reads_one_job_document_not_the_jobs_shards(db, test_env) -> None:
    await started_job(db, "o1", shards=200)
    for i in range(3):
        await finish(db, "o1", i, ShardState.SUCCEEDED, done=10)
    listener = Commands()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[listener], tz_aware=True)
    try:
        scheduler = JobScheduler(client[db.name], Dispatcher())
        await scheduler.shard_finished(event("o1", "o1:0001"))
        await scheduler.shard_finished(event("o1", "o1:0001"))
    finally:
        await client.close()
    # Each event reads its own shard by `_id` (`$in` the keys of its batch: here one) and its
    # checkpoint by _id; nothing selects by job.
    assert [f for c, f in listener.filters if c in (SHARDS, CHECKPOINTS) and "job_id" in f] == [], listener.filters
    assert [f for c, f in listener.filters if c == SHARDS] == [{"_id": {"$in": ["o1:0001"]}}] * 2
    assert [f for c, f in listener.filters if c == CHECKPOINTS] == [{"_id": "o1:0001/main"}] * 2
    assert (await counts(db, "o1"))["shards_succeeded"] == 1


async def test_a_shards_first_event_costs_four_round_trips_and_a_duplicate_adds_nothing(db, test_env) -> None:
    await started_job(db, "rt", shards=3)
    await finish(db, "rt", 0, ShardState.SUCCEEDED, done=10)
    listener = Commands()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[listener], tz_aware=True)
    try:
        scheduler = JobScheduler(client[db.name], Dispatcher())
        await scheduler.shard_finished(event("rt", "rt:0000"))
        first = [seen for seen in listener.seen if seen[1]]
        listener.seen.clear()
        await scheduler.shard_finished(event("rt", "rt:0000"))  # a redelivery
    finally:
        await client.close()
    # The shard by key, its checkpoint by _id, one write of its ledger bucket, then one write of
    # the job that also returns what the roll-up needs: no read of the job before or after.
    assert first == [("find", SHARDS), ("find", CHECKPOINTS), ("findAndModify", JOB_TALLIES), ("findAndModify", JOBS)], first
    assert (await counts(db, "rt"))["shards_succeeded"] == 1
    assert (await counts(db, "rt"))["records_done"] == 10
    assert ("find", JOB_TALLIES) in listener.seen  # the duplicate's guess failed: the ledger entry was read, nothing added
    assert (await db[JOBS].find_one({"_id": "rt"}))["state"] == JobState.STARTED


async def test_a_succeeded_shard_with_its_totals_is_counted_from_the_shard_alone(db, test_env) -> None:
    await started_job(db, "tt", shards=2)
    key = "tt:0000"
    totals = {counter: 0 for counter in tally.TOTALS} | {"records_done": 7, "records_written": 7, "batches": 1}
    await db[SHARDS].update_one({"_id": key}, {"$set": {"state": ShardState.SUCCEEDED, "totals": totals}})
    listener = Commands()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[listener], tz_aware=True)
    try:
        await JobScheduler(client[db.name], Dispatcher()).shard_finished(event("tt", key))
    finally:
        await client.close()
    assert [seen for seen in listener.seen if seen[1]] == [("find", SHARDS), ("findAndModify", JOB_TALLIES), ("findAndModify", JOBS)]
    assert (await counts(db, "tt"))["records_done"] == 7 and (await counts(db, "tt"))["shards_succeeded"] == 1


# Batches: the events a scheduler is handed together (`consumer.Batched`) are counted with one read
# of their shards and one write per job, still exactly once.


async def ledger(db: Any, job_id: str) -> dict[str, str]:
    return await tally.ledger(db, job_id)


async def test_a_batch_of_one_jobs_shards_is_added_with_one_read_of_them_and_one_job_write(db, test_env) -> None:
    await started_job(db, "b1", shards=8)
    keys = [await finish(db, "b1", i, ShardState.SUCCEEDED, done=10 + i, batches=2) for i in range(5)]
    keys.append(await finish(db, "b1", 5, ShardState.FAILED, done=3))
    listener = Commands()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[listener], tz_aware=True)
    try:
        written = await tally.count_many(client[db.name], [*keys, "b1:0003", "nope:0001"], fields={tally.COUNTS: 1})
    finally:
        await client.close()

    assert [seen for seen in listener.seen if seen[1] == SHARDS] == [("find", SHARDS)]
    assert [seen for seen in listener.seen if seen[1] == JOBS] == [("findAndModify", JOBS)]
    assert [seen for seen in listener.seen if seen[1] == JOB_TALLIES] == [("findAndModify", JOB_TALLIES)]
    assert set(written) == {"b1"}  # the unknown key is skipped
    assert written["b1"] is not None and tally.counts_of(written["b1"]) == await counts(db, "b1")
    assert await counts(db, "b1") == FIVE_SUCCEEDED_ONE_FAILED
    assert sorted(await ledger(db, "b1")) == [f"s{i:04d}" for i in range(6)]
    assert (await ledger(db, "b1"))["s0005"].startswith("FAILED|3|")

    assert await tally.count_many(db, keys) == {"b1": None}  # the same batch again: nothing written
    assert (await counts(db, "b1"))["shards_succeeded"] == 5


async def test_a_batch_of_a_hundred_shards_adds_every_one_of_them(db) -> None:
    # Combined writes of at most COMBINED_ENTRIES entries: the stand-in drops the `$inc` of an
    # update of 63 fields or more (docs/mongodb-stand-in.md), leaving ledger and counters apart.
    await started_job(db, "big", shards=100)
    keys = [await finish(db, "big", i, ShardState.SUCCEEDED, done=10) for i in range(100)]

    await tally.count_many(db, keys)

    assert len(await ledger(db, "big")) == 100
    assert (await counts(db, "big"))["shards_succeeded"] == 100 and (await counts(db, "big"))["records_done"] == 1000


async def test_a_batch_with_a_shard_counted_already_adds_only_the_others(db) -> None:
    await started_job(db, "bd", shards=4)
    keys = [await finish(db, "bd", i, ShardState.SUCCEEDED, done=10) for i in range(4)]
    assert await tally.count_shard(db, keys[1]) is True  # its event was handled before the batch

    written = await tally.count_many(db, [keys[0], keys[1], keys[2]], fields={tally.COUNTS: 1})

    # The combined write found s0001 there and matched nothing; one by one, s0000 and s0002 were added.
    assert written["bd"] is not None and tally.counts_of(written["bd"])["shards_succeeded"] == 3
    assert (await counts(db, "bd"))["shards_succeeded"] == 3
    assert (await counts(db, "bd"))["records_done"] == 30
    assert sorted(await ledger(db, "bd")) == ["s0000", "s0001", "s0002"]


async def test_batches_racing_each_other_and_single_counts_add_each_shard_once(db) -> None:
    await started_job(db, "br", shards=12)
    keys = [await finish(db, "br", i, ShardState.SUCCEEDED, done=10 + i) for i in range(12)]
    await asyncio.gather(
        tally.count_many(db, keys),
        tally.count_many(db, list(reversed(keys))),
        tally.count_many(db, keys[::2]),
        *(tally.count_shard(db, key) for key in keys[1::3]),
    )
    assert (await counts(db, "br"))["shards_succeeded"] == 12
    assert (await counts(db, "br"))["records_done"] == sum(10 + i for i in range(12))


async def test_a_batch_with_shards_of_two_jobs_writes_each_job_once(db, test_env) -> None:
    await started_job(db, "ja", shards=3)
    await started_job(db, "jb", shards=3)
    a = [await finish(db, "ja", i, ShardState.SUCCEEDED, done=10) for i in range(3)]
    b = [await finish(db, "jb", i, ShardState.CANCELLED, done=2) for i in range(2)]
    listener = Commands()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[listener], tz_aware=True)
    try:
        written = await tally.count_many(client[db.name], [a[0], b[0], a[1], b[1], a[2]])
    finally:
        await client.close()

    assert set(written) == {"ja", "jb"} and all(written.values())
    assert [f["_id"] for c, f in listener.filters if c == JOBS] in (["ja", "jb"], ["jb", "ja"])
    ja, jb = await counts(db, "ja"), await counts(db, "jb")
    assert (ja["shards_succeeded"], ja["shards_cancelled"], ja["records_done"], ja["weight_done"]) == (3, 0, 30, 30)
    assert (jb["shards_succeeded"], jb["shards_cancelled"], jb["records_done"], jb["weight_done"]) == (0, 2, 4, 0)


async def test_a_reopened_shard_in_a_batch_is_taken_out_while_the_others_are_added(db) -> None:
    await started_job(db, "bo", shards=3)
    reopened = await finish(db, "bo", 0, ShardState.FAILED, done=4)
    await tally.count_shard(db, reopened)
    await db[SHARDS].update_one({"_id": reopened}, {"$set": {"state": ShardState.QUEUED}})  # a DLQ replay
    ended = [await finish(db, "bo", i, ShardState.SUCCEEDED, done=10) for i in (1, 2)]

    written = await tally.count_many(db, [reopened, *ended], fields={tally.COUNTS: 1})

    assert written["bo"] is not None
    after = await counts(db, "bo")
    assert (after["shards_failed"], after["shards_succeeded"], after["records_done"]) == (0, 2, 20)
    assert sorted(await ledger(db, "bo")) == ["s0001", "s0002"]


async def test_a_batch_of_events_that_ends_a_job_finishes_it(db) -> None:
    scheduler = await started_job(db, "bf", shards=4)
    keys = [await finish(db, "bf", i, ShardState.SUCCEEDED, done=10) for i in range(3)]
    await scheduler.shards_finished([event("bf", key) for key in keys])
    assert (await db[JOBS].find_one({"_id": "bf"}))["state"] == JobState.STARTED

    last = await finish(db, "bf", 3, ShardState.SUCCEEDED, done=10)
    await scheduler.shards_finished([event("bf", last), event("bf", keys[0]), event("bf", last)])  # with duplicates

    job = await db[JOBS].find_one({"_id": "bf"})
    assert job["state"] == JobState.SUCCESS
    assert (job["result"]["records_done"], job["result"]["shards_succeeded"]) == (40, 4)


# The ledger lives in buckets of consecutive shards beside the job (`job_tallies`); the job holds
# one snapshot per bucket, so its document does not grow with the shards it counted.


async def test_shards_of_several_buckets_are_counted_into_each_and_the_job_holds_one_snapshot_per_bucket(db) -> None:
    shards = 2 * tally.BUCKET_SHARDS + 5
    scheduler = await started_job(db, "many", shards=shards)
    keys = [await finish(db, "many", i, ShardState.SUCCEEDED, done=10) for i in range(shards)]

    await scheduler.shards_finished([event("many", key) for key in reversed(keys)])

    job = await db[JOBS].find_one({"_id": "many"})
    assert job["state"] == JobState.SUCCESS and job["result"]["records_done"] == 10 * shards
    assert sorted(job[tally.LEDGER]) == ["b0", "b1", "b2"]  # no entry per shard in the job
    buckets = {b["bucket"]: b async for b in db[JOB_TALLIES].find({"job_id": "many"})}
    assert sorted(buckets) == [0, 1, 2]
    assert [len(buckets[b]["entries"]) for b in (0, 1, 2)] == [tally.BUCKET_SHARDS, tally.BUCKET_SHARDS, 5]
    assert sum(tally.counts_of(b)["records_done"] for b in buckets.values()) == 10 * shards


async def test_a_count_whose_job_write_was_lost_is_applied_by_the_next_event_or_the_roll_up(db) -> None:
    # What a scheduler killed between its two writes leaves: the bucket has the shard, the job not.
    scheduler = await started_job(db, "half", shards=3)
    keys = [await finish(db, "half", i, ShardState.SUCCEEDED, done=10) for i in range(3)]
    first = await db[SHARDS].find_one({"_id": keys[0]}, tally.SHARD_FIELDS)
    await tally._write_bucket(db, "half", 0, {"s0000": (None, await tally.shard_entry(db, first))})
    assert (await counts(db, "half"))["shards_succeeded"] == 0

    await scheduler.shard_finished(event("half", keys[0]))  # the redelivered event: a duplicate for the bucket
    assert (await counts(db, "half"))["shards_succeeded"] == 1

    second = await db[SHARDS].find_one({"_id": keys[1]}, tally.SHARD_FIELDS)
    await tally._write_bucket(db, "half", 0, {"s0001": (None, await tally.shard_entry(db, second))})
    await scheduler.shard_finished(event("half", keys[2]))  # the next count in that bucket catches up too
    assert (await counts(db, "half"))["shards_succeeded"] == 3
    assert (await db[JOBS].find_one({"_id": "half"}))["state"] == JobState.SUCCESS


async def test_a_roll_up_never_finishes_a_job_from_counters_a_replay_changed_meanwhile(db) -> None:
    scheduler = await started_job(db, "race", shards=2)
    keys = [await finish(db, "race", i, ShardState.SUCCEEDED, done=10) for i in range(2)]
    await tally.count_shard(db, keys[0])
    _, decided_from = await tally.count_and_read(db, keys[1], fields={"state": 1, "shard_count": 1, tally.COUNTS: 1, "spec": 1})
    # Between that read and the roll-up's write, a replay takes shard 1 back out.
    await db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"state": ShardState.QUEUED}})
    await tally.count_shard(db, keys[1])

    await scheduler.roll_up_counted("race", job=decided_from)  # all ended, as that job document says

    assert (await db[JOBS].find_one({"_id": "race"}))["state"] == JobState.STARTED
    assert (await counts(db, "race"))["shards_succeeded"] == 1


async def test_the_periodic_roll_up_applies_a_bucket_its_job_lags_behind(db) -> None:
    scheduler = await started_job(db, "lag", shards=2)
    keys = [await finish(db, "lag", i, ShardState.SUCCEEDED, done=10) for i in range(2)]
    for key in keys:
        shard = await db[SHARDS].find_one({"_id": key}, tally.SHARD_FIELDS)
        await tally._write_bucket(db, "lag", 0, {tally.ledger_key("lag", key): (None, await tally.shard_entry(db, shard))})

    assert await scheduler.roll_up("lag") == JobState.SUCCESS
    assert (await counts(db, "lag"))["records_done"] == 20
    assert await tally.uncounted(db, "lag") == 0  # nothing left to apply


async def test_a_finished_jobs_counters_stay_final_until_a_replay_reopens_it(db) -> None:
    scheduler = await started_job(db, "fin", shards=2)
    keys = [await finish(db, "fin", i, ShardState.SUCCEEDED, done=10) for i in range(2)]
    await scheduler.shards_finished([event("fin", key) for key in keys])
    assert (await db[JOBS].find_one({"_id": "fin"}))["state"] == JobState.SUCCESS
    await db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"state": ShardState.QUEUED}})

    await tally.count_shard(db, keys[0])  # recorded in its bucket, not applied: the job is final

    assert (await counts(db, "fin"))["shards_succeeded"] == 2
    await db[JOBS].update_one({"_id": "fin"}, {"$set": {"state": JobState.STARTED}})  # what a replay does first
    await tally.uncounted(db, "fin")
    assert (await counts(db, "fin"))["shards_succeeded"] == 1


async def legacy_job(db: Any, job_id: str, shards: int, counted: int, failed: int | None = None, state: JobState = JobState.STARTED) -> list[str]:
    """A job an older Cairn counted: its first `counted` shards ended (`failed` FAILED, the others
    SUCCEEDED) and in the in-document ledger (`tally.s<index>`), the counters their sum, no bucket."""
    await started_job(db, job_id, shards=shards)
    keys = [await finish(db, job_id, i, ShardState.FAILED if i == failed else ShardState.SUCCEEDED, done=10) for i in range(counted)]
    legacy: dict[str, str] = {}
    added: Counter[str] = Counter()
    for i, key in enumerate(keys):
        legacy[f"s{i:04d}"] = str(await tally.shard_entry(db, await db[SHARDS].find_one({"_id": key}, tally.SHARD_FIELDS)))
        added.update(tally.contribution(legacy[f"s{i:04d}"]))
    await db[JOB_TALLIES].delete_many({"job_id": job_id})  # an older scheduler made no buckets
    await db[JOBS].update_one({"_id": job_id}, {"$set": {
        "state": state, **{f"{tally.LEGACY_LEDGER}.{k}": v for k, v in legacy.items()}, **{f"{tally.COUNTS}.{k}": v for k, v in added.items()},
    }})
    return keys


async def test_a_job_counted_by_an_older_cairn_is_moved_to_buckets_once_and_counts_on(db) -> None:
    keys = await legacy_job(db, "old", shards=3, counted=2)
    keys.append(await finish(db, "old", 2, ShardState.SUCCEEDED, done=10))

    assert await tally.migrate_legacy_ledgers(db) == 1
    assert await tally.migrate_legacy_ledgers(db) == 0  # idempotent

    job = await db[JOBS].find_one({"_id": "old"})
    assert sorted(job[tally.LEDGER]) == ["b0"] and tally.LEGACY_LEDGER not in job
    assert sorted(await tally.ledger(db, "old")) == ["s0000", "s0001"]
    await JobScheduler(db, Dispatcher()).shards_finished([event("old", key) for key in keys])  # two duplicates and the new one
    job = await db[JOBS].find_one({"_id": "old"})
    assert job["state"] == JobState.SUCCESS
    assert job["result"]["records_done"] == 30 and job["result"]["shards_succeeded"] == 3


async def test_a_finished_job_of_an_older_cairn_is_moved_too_and_a_replay_of_it_counts_once(db) -> None:
    # A DLQ replay reopens a finished job: its old ledger must be in buckets by then, or the shard
    # would be counted in both (and the old entries broke the reconcile pass).
    keys = await legacy_job(db, "oldfin", shards=3, counted=3, failed=2, state=JobState.FAILURE)
    assert await tally.migrate_legacy_ledgers(db) == 1

    await db[SHARDS].update_one({"_id": keys[2]}, {"$set": {"state": ShardState.QUEUED}})  # the replay
    await db[JOBS].update_one({"_id": "oldfin"}, {"$set": {"state": JobState.STARTED}, "$unset": {"result": ""}})
    assert await tally.count_shard(db, keys[2]) is True  # taken out
    await finish(db, "oldfin", 2, ShardState.SUCCEEDED, done=10)
    scheduler = JobScheduler(db, Dispatcher())
    await scheduler.shard_finished(event("oldfin", keys[2]))
    assert await tally.migrate_legacy_ledgers(db) == 0  # a scheduler restarting changes nothing
    await scheduler.roll_up("oldfin")

    job = await db[JOBS].find_one({"_id": "oldfin"})
    assert job["state"] == JobState.SUCCESS
    assert (job["result"]["shards_succeeded"], job["result"]["shards_failed"], job["result"]["records_done"]) == (3, 0, 30)


async def test_an_old_ledger_too_large_for_one_update_is_moved_whole(db) -> None:
    # 300 entries: one update unsetting them all is past what the stand-in applies (~129 fields).
    keys = await legacy_job(db, "oldbig", shards=301, counted=300)
    assert await tally.migrate_legacy_ledgers(db) == 1

    job = await db[JOBS].find_one({"_id": "oldbig"})
    assert sorted(job[tally.LEDGER]) == ["b0", "b1", "b2"] and tally.LEGACY_LEDGER not in job  # no old entry left
    assert len(await tally.ledger(db, "oldbig")) == 300
    last = await finish(db, "oldbig", 300, ShardState.SUCCEEDED, done=10)
    await JobScheduler(db, Dispatcher()).shards_finished([event("oldbig", key) for key in [*keys[-3:], last]])
    job = await db[JOBS].find_one({"_id": "oldbig"})
    assert job["state"] == JobState.SUCCESS and job["result"]["records_done"] == 3010


async def test_a_job_whose_bucket_disagrees_with_its_old_ledger_is_left_as_it_is(db, caplog) -> None:
    await legacy_job(db, "oldx", shards=2, counted=1)
    await db[JOB_TALLIES].insert_one({"_id": "oldx/0", "job_id": "oldx", "bucket": 0, "entries": {"s0001": "SUCCEEDED|1|1|0|1|0|0|0|0|1"}, "seq": 1})

    assert await tally.migrate_legacy_ledgers(db) == 0

    job = await db[JOBS].find_one({"_id": "oldx"})
    assert sorted(job[tally.LEGACY_LEDGER]) == ["s0000"] and tally.LEDGER not in job
    assert "exists with other entries" in caplog.text
