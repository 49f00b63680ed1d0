"""Fair dispatch across tenants (issue 15): the pure decision `fair_pick`, then the pass with the
JobScheduler against the MongoDB-wire server and a dispatcher recording each bulk dispatch."""

import asyncio
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient, monitoring

from cairn_contracts.messages import RunFrontier, RunShard, RunShards, ShardFinished, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import JOBS, SHARDS
from cairn_contracts.tasks import shard_keys_of
from cairn_contracts.tenancy import TENANTS
from cairn_scheduler.fairness import FairDispatch, fair_pick
from cairn_scheduler.jobs import JobScheduler


def test_a_large_tenant_is_held_at_its_cap_and_a_small_one_gets_its_shard_at_once() -> None:
    waiting = {"big": [f"big-{i}" for i in range(1000)], "small": ["small-0"]}
    picked = fair_pick(waiting, {"big": 2, "small": 0}, lambda tenant: 4)
    assert picked[0] == ("small", "small-0")  # fewest in flight first
    assert [item for tenant, item in picked if tenant == "big"] == ["big-0", "big-1"]  # up to its cap of 4


def test_room_is_shared_round_robin_within_a_budget() -> None:
    waiting = {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2", "b3"], "c": ["c0"]}
    picked = fair_pick(waiting, {}, lambda tenant: None, budget=6)
    assert picked == [("a", "a0"), ("b", "b0"), ("c", "c0"), ("a", "a1"), ("b", "b1"), ("a", "a2")]


def test_nothing_is_picked_for_a_tenant_at_its_cap_or_when_the_budget_is_spent() -> None:
    assert fair_pick({"a": ["a0"]}, {"a": 3}, lambda tenant: 3) == []
    assert fair_pick({"a": ["a0"]}, {}, lambda tenant: None, budget=0) == []
    assert fair_pick({"a": [], "b": ["b0"]}, {}, lambda tenant: 1) == [("b", "b0")]


def test_per_tenant_caps_differ() -> None:
    caps = {"gold": 3, "free": 1}
    picked = fair_pick({"gold": ["g0", "g1", "g2", "g3"], "free": ["f0", "f1"]}, {}, caps.__getitem__)
    assert sorted(item for _, item in picked) == ["f0", "g0", "g1", "g2"]


# --- FairDispatch with JobScheduler, against the MongoDB-wire server --------------------------------
class BulkRecorder:
    """A dispatcher that records each bulk dispatch (`dispatch_many`) as one call."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], int]] = []

    async def dispatch(self, task: RunShard | RunShards | RunFrontier, priority: int) -> None:
        self.batches.append((shard_keys_of(task), priority))

    async def dispatch_many(self, tasks: list[RunShard | RunShards | RunFrontier], priority: int) -> None:
        self.batches.append(([key for task in tasks for key in shard_keys_of(task)], priority))

    @property
    def keys(self) -> list[str]:
        return [key for keys, _ in self.batches for key in keys]


def start(job_id: str, tenant: str, shards: int, priority: int = 2, batch_size: int = 5) -> StartJob:
    """A job of `shards` shards of 10 records: with the default batch of 5 each is larger than a
    batch and goes in a task of its own (bundles.py), so a task is a shard; a batch of 10 or more
    bundles them."""
    return StartJob.model_validate(
        {
            "job_id": job_id,
            "tenant": tenant,
            "spec": {
                "pipeline": "synthetic",
                "params": {"count": shards * 10},
                "sharding": {"shards": shards},
                "priority": priority,
                "batch_size": batch_size,
            },
        }
    )


async def record(db: Any, command: StartJob, created_at_ms: int) -> None:
    await db[JOBS].insert_one(
        {
            "_id": command.job_id,
            "tenant": command.tenant,
            "pipeline": command.spec.pipeline,
            "priority": int(command.spec.priority),
            "spec": command.spec.model_dump(mode="json"),
            "state": JobState.PENDING,
            "created_at": datetime.now(UTC),
            "created_at_ms": created_at_ms,
        }
    )


async def queued(db: Any, job_id: str) -> int:
    return await db[SHARDS].count_documents({"job_id": job_id, "state": ShardState.QUEUED})


async def test_a_large_job_is_held_at_its_tenants_cap_and_another_tenants_job_is_sent_at_once(db) -> None:
    dispatcher = BulkRecorder()
    fair = FairDispatch(db, dispatcher, default_cap=3, refill_interval_s=0)  # a pass per event
    scheduler = JobScheduler(db, dispatcher, fair=fair)
    large, small = start("big-job", "big", 40), start("small-job", "small", 1)
    await record(db, large, 1)
    await record(db, small, 2)

    await scheduler.start_job(large)
    assert await queued(db, "big-job") == 3  # its cap; the other 37 wait PLANNED in MongoDB
    assert len(dispatcher.batches) == 1 and len(dispatcher.batches[0][0]) == 3  # one bulk dispatch
    await scheduler.start_job(small)
    assert dispatcher.keys[-1] == "small-job:0000" and await queued(db, "small-job") == 1

    # A finished shard of the big job frees one slot of its tenant, refilled at once.
    await db[SHARDS].update_one({"shard_key": "big-job:0000"}, {"$set": {"state": ShardState.SUCCEEDED}})
    await scheduler.shard_finished(ShardFinished(job_id="big-job", shard_key="big-job:0000", outcome="succeeded", records_done=10))
    assert await queued(db, "big-job") == 3
    assert dispatcher.keys.count("big-job:0003") == 1
    assert await fair.run_pass() == 0  # nothing fits: every tenant is at its cap or has nothing left


async def test_a_tenants_room_is_what_its_running_jobs_have_in_flight_no_other_shard(db) -> None:
    """In flight for a tenant: the QUEUED and RUNNING shards of all its running jobs. Shards
    another tenant has in flight, or left RUNNING by a job being cancelled, take none of its room."""
    dispatcher = BulkRecorder()
    fair = FairDispatch(db, dispatcher, default_cap=4, refill_interval_s=0)
    scheduler = JobScheduler(db, dispatcher, fair=fair)
    jobs = [start("t-first", "t", 2), start("o-job", "o", 3), start("t-cancelled", "t", 3)]
    for created, command in enumerate(jobs):
        await record(db, command, created)
        await scheduler.start_job(command)
    assert [await queued(db, job.job_id) for job in jobs] == [2, 3, 2]  # t at its cap of 4
    await db[SHARDS].update_many({"job_id": {"$in": ["t-cancelled", "o-job"]}, "state": ShardState.QUEUED}, {"$set": {"state": ShardState.RUNNING}})
    await db[SHARDS].update_one({"_id": "t-first:0000"}, {"$set": {"state": ShardState.RUNNING}})
    await db[JOBS].update_one({"_id": "t-cancelled"}, {"$set": {"cancel_requested": True}})

    second = start("t-second", "t", 10)
    await record(db, second, 3)
    await scheduler.start_job(second)

    assert await queued(db, "t-second") == 2  # 4 - t-first's 2 in flight (one queued, one running)


class UnconfirmedDispatch(BulkRecorder):
    """A dispatcher whose broker stops confirming once `down` is set."""

    down = False

    async def dispatch_many(self, tasks: list[RunShard | RunShards | RunFrontier], priority: int) -> None:
        if self.down:
            raise ConnectionError("the broker did not confirm")
        await super().dispatch_many(tasks, priority)


async def test_a_failing_refill_does_not_keep_a_batch_of_shard_events_uncounted(db) -> None:
    """A refill that fails after a batch of shard events is logged, not raised: the events are
    counted (another tenant's job finishes) and acked, and what the refill could not send is
    left for the next pass (`backlog` stays set)."""
    dispatcher = UnconfirmedDispatch()
    fair = FairDispatch(db, dispatcher, default_cap=1, refill_interval_s=0)
    scheduler = JobScheduler(db, dispatcher, fair=fair)
    for created, command in enumerate([start("big", "a", 3), start("small", "b", 1)]):
        await record(db, command, created)
        await scheduler.start_job(command)
    for shard_key in ("small:0000", "big:0000"):
        await db[SHARDS].update_one({"_id": shard_key}, {"$set": {"state": ShardState.SUCCEEDED}})
    dispatcher.down = True

    await scheduler.shards_finished(
        [ShardFinished(job_id=job, shard_key=f"{job}:0000", outcome="succeeded", records_done=10) for job in ("big", "small")]
    )

    assert (await db[JOBS].find_one({"_id": "small"}))["state"] == JobState.SUCCESS
    assert fair.backlog  # big's next shard still waits for a pass
    dispatcher.down = False
    assert await fair.run_pass() == 1 and dispatcher.keys[-1] == "big:0001"


async def test_shard_events_run_passes_only_while_shards_are_left_waiting(db) -> None:
    """Once every PLANNED shard is out, a shard event costs no pass (no scan of running jobs and
    shards in flight); while the cap holds some back, each event refills the freed room."""
    dispatcher = BulkRecorder()
    fair = FairDispatch(db, dispatcher, default_cap=3, refill_interval_s=0)  # a pass per event
    scheduler = JobScheduler(db, dispatcher, fair=fair)
    job = start("five-job", "solo", 5)
    await record(db, job, 1)
    await scheduler.start_job(job)
    assert await queued(db, "five-job") == 3 and fair.backlog  # two held back by the cap

    for index in range(3):
        await db[SHARDS].update_one({"shard_key": f"five-job:{index:04d}"}, {"$set": {"state": ShardState.SUCCEEDED}})
    assert await fair.after_shard_finished() == 2  # the rest go out
    assert not fair.backlog  # nothing left PLANNED: the room was larger than what waited

    sent = len(dispatcher.keys)
    assert await fair.after_shard_finished() == 0 and len(dispatcher.keys) == sent
    await db[SHARDS].insert_one({"_id": "five-job:0005", "shard_key": "five-job:0005", "job_id": "five-job", "index": 5,
                                 "state": ShardState.PLANNED, "strategy": "range"})
    assert await fair.after_shard_finished() == 0  # an event alone does not look for it...
    assert await fair.run_pass() == 1  # ...the periodic (or after-planning) pass does


async def capped_job(db: Any, job_id: str, shards: int, refill_interval_s: float) -> tuple[BulkRecorder, FairDispatch]:
    """A planned job of one tenant under a cap of 3: its planning pass sent 3, held back the rest."""
    dispatcher = BulkRecorder()
    fair = FairDispatch(db, dispatcher, default_cap=3, refill_interval_s=refill_interval_s)
    job = start(job_id, "solo", shards)
    await record(db, job, 1)
    await JobScheduler(db, dispatcher, fair=fair).start_job(job)
    assert await queued(db, job_id) == 3 and len(dispatcher.batches) == 1
    return dispatcher, fair


async def test_a_burst_of_shard_events_is_refilled_by_one_pass_at_the_end_of_the_refill_interval(db) -> None:
    """A pass reads every in-flight shard of the running jobs: events that come within
    `refill_interval_s` of the last pass share one pass, run when the interval is over."""
    dispatcher, fair = await capped_job(db, "burst-job", 9, refill_interval_s=0.3)

    for index in range(3):
        await db[SHARDS].update_one({"shard_key": f"burst-job:{index:04d}"}, {"$set": {"state": ShardState.SUCCEEDED}})
        assert await fair.after_shard_finished() == 0  # put off: within the interval of the planning pass
    assert len(dispatcher.batches) == 1  # nothing sent yet
    await asyncio.wait_for(fair._refill, timeout=10)  # type: ignore[arg-type]
    assert len(dispatcher.batches) == 2 and len(dispatcher.batches[1][0]) == 3  # one pass refilled all three
    assert await queued(db, "burst-job") == 3  # the three sent now (the first three SUCCEEDED)


async def test_closing_cancels_a_refill_put_off_to_later(db) -> None:
    dispatcher, fair = await capped_job(db, "closing-job", 6, refill_interval_s=60)
    assert await fair.after_shard_finished() == 0  # put off by a minute
    refill = fair._refill
    assert refill is not None and not refill.done()

    await fair.close()

    assert refill.cancelled() and len(dispatcher.batches) == 1  # nothing more sent


async def test_a_tenants_own_cap_and_a_global_budget_are_honoured_round_robin(db) -> None:
    await db[TENANTS].insert_one({"_id": "gold", "quotas": {"max_in_flight_shards": 10}})
    planner = JobScheduler(db, BulkRecorder(), fair=FairDispatch(db, BulkRecorder(), default_cap=1, budget=0))  # plans, sends nothing
    for number, (job_id, tenant) in enumerate([("gold-job", "gold"), ("free-job", "free")]):
        await record(db, start(job_id, tenant, 6), number)
        await planner.start_job(start(job_id, tenant, 6))
    assert await db[SHARDS].count_documents({"state": ShardState.PLANNED}) == 12

    dispatcher = BulkRecorder()
    assert await FairDispatch(db, dispatcher, default_cap=1, budget=4).run_pass() == 4  # the budget
    assert await queued(db, "free-job") == 1  # its default cap
    assert await queued(db, "gold-job") == 3  # the rest of the budget: its own cap is 10
    assert dispatcher.keys[:2] in (["gold-job:0000", "free-job:0000"], ["free-job:0000", "gold-job:0000"])  # round-robin


async def test_a_tenants_high_priority_backlog_does_not_bury_another_tenants_task_in_the_queue(db) -> None:
    # The ingest queue is a priority queue: a task published at a higher priority is delivered
    # before every lower one. A tenant choosing CRITICAL for its large job must not keep another
    # tenant's queued LOW shard behind the tasks it refills its cap with for as long as its job lasts.
    dispatcher = BulkRecorder()
    scheduler = JobScheduler(db, dispatcher, fair=FairDispatch(db, dispatcher, default_cap=3, refill_interval_s=0))
    loud, quiet = start("loud-job", "loud", 40, priority=4), start("quiet-job", "quiet", 1, priority=1)
    await record(db, loud, 1)
    await record(db, quiet, 2)
    await scheduler.start_job(loud)
    await scheduler.start_job(quiet)
    quiet_sent = len(dispatcher.batches)

    async def finish(index: int) -> None:  # a loud shard finishes: its tenant's cap is refilled
        key = f"loud-job:{index:04d}"
        await db[SHARDS].update_one({"shard_key": key}, {"$set": {"state": ShardState.SUCCEEDED}})
        await scheduler.shard_finished(ShardFinished(job_id="loud-job", shard_key=key, outcome="succeeded", records_done=10))

    for index in range(3):
        await finish(index)
    quiet_priority = next(priority for keys, priority in dispatcher.batches if "quiet-job:0000" in keys)
    refills = [priority for keys, priority in dispatcher.batches[quiet_sent:] if any(key.startswith("loud-job") for key in keys)]
    assert refills and max(refills) <= quiet_priority, dispatcher.batches  # behind it in the queue, not ahead

    # Once the quiet task is taken, the loud job's own priority counts again.
    await db[SHARDS].update_one({"shard_key": "quiet-job:0000"}, {"$set": {"state": ShardState.RUNNING}})
    sent = len(dispatcher.batches)
    await finish(3)
    assert [priority for _, priority in dispatcher.batches[sent:]] == [4]


class TaskRecorder(BulkRecorder):
    """A BulkRecorder that also keeps each task's shard keys."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[list[str]] = []

    async def dispatch_many(self, tasks: list[RunShard | RunShards | RunFrontier], priority: int) -> None:
        self.tasks += [shard_keys_of(task) for task in tasks]
        await super().dispatch_many(tasks, priority)


async def in_flight_tasks(db: Any, job_id: str) -> set[str]:
    """The job's tasks in flight: a task's key, or `alone:<key>` for a shard sent alone."""
    return {
        shard.get("queued_task") or f"alone:{shard['_id']}"
        async for shard in db[SHARDS].find({"job_id": job_id, "state": {"$in": [ShardState.QUEUED, ShardState.RUNNING]}})
    }


async def small_shard_job(db: Any, job_id: str, cap: int) -> tuple[TaskRecorder, FairDispatch]:
    """A job of 40 shards of 10 records in batches of 100 (bundles of 10), planned and sent under a
    tenant cap of `cap` tasks."""
    dispatcher = TaskRecorder()
    fair = FairDispatch(db, dispatcher, default_cap=cap, refill_interval_s=0)
    job = start(job_id, "t", 40, batch_size=100)
    await record(db, job, 1)
    await JobScheduler(db, dispatcher, fair=fair).start_job(job)
    return dispatcher, fair


async def test_a_bundle_of_small_shards_counts_once_towards_the_cap_while_any_of_its_shards_is_in_flight(db) -> None:
    """The cap counts tasks: 40 shards of 10 records in batches of 100 go in bundles of 10, and a
    cap of 2 sends two bundles (20 shards). A bundle holds its slot until its last shard ends; then
    its room goes to the next bundle."""
    dispatcher, fair = await small_shard_job(db, "small-shards", cap=2)

    assert dispatcher.tasks == [[f"small-shards:{i:04d}" for i in range(10)], [f"small-shards:{i:04d}" for i in range(10, 20)]]
    assert await queued(db, "small-shards") == 20
    assert await in_flight_tasks(db, "small-shards") == {"small-shards:0000", "small-shards:0010"}
    for index in range(9):  # the first bundle's shards end, all but its last
        await db[SHARDS].update_one({"_id": f"small-shards:{index:04d}"}, {"$set": {"state": ShardState.SUCCEEDED}})
    await db[SHARDS].update_one({"_id": "small-shards:0009"}, {"$set": {"state": ShardState.RUNNING}})
    assert await fair.run_pass() == 0  # its task is still in flight

    await db[SHARDS].update_one({"_id": "small-shards:0009"}, {"$set": {"state": ShardState.SUCCEEDED}})
    assert await fair.run_pass() == 10
    assert dispatcher.tasks[-1] == [f"small-shards:{i:04d}" for i in range(20, 30)]


async def test_a_shard_sent_again_on_its_own_counts_as_a_task_of_its_own(db) -> None:
    """A bundle's shard re-sent alone (a retry due, a reclaimed lease, a replay: `queued_task`
    null) takes a slot of its own beside the bundle it came from, also the bundle's first shard
    (whose key is the bundle's)."""
    dispatcher, fair = await small_shard_job(db, "resent", cap=3)
    assert len(dispatcher.tasks) == 3  # bundles 0-9, 10-19, 20-29
    for index in range(10, 30):  # two bundles end
        await db[SHARDS].update_one({"_id": f"resent:{index:04d}"}, {"$set": {"state": ShardState.SUCCEEDED}})
    for index in (0, 4):  # two shards of the first bundle are sent again, each on its own
        await db[SHARDS].update_one({"_id": f"resent:{index:04d}"}, {"$set": {"state": ShardState.QUEUED, "queued_task": None}})

    assert await in_flight_tasks(db, "resent") == {"resent:0000", "alone:resent:0000", "alone:resent:0004"}
    assert await fair.run_pass() == 0  # the cap of 3 is full: the bundle and the two sent alone


class PlannedReads(monitoring.CommandListener):
    """The `limit` of every read of PLANNED shards (a fair pass's look for what to send)."""

    def __init__(self) -> None:
        self.limits: list[int] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == SHARDS and event.command.get("filter", {}).get("state") == ShardState.PLANNED:
            self.limits.append(int(event.command.get("limit") or 0))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_pass_reads_a_jobs_large_shards_only_as_far_as_its_room_and_small_ones_as_far_as_bundles_carry(db, test_env) -> None:
    """A job of large shards: a pass reads at most its tenant's room of them, as before bundles
    counted once; a job of small shards: on, up to what the room's bundles can carry."""
    reads = PlannedReads()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[reads], tz_aware=True)
    try:
        watched = client[db.name]
        dispatcher = TaskRecorder()
        fair = FairDispatch(watched, dispatcher, default_cap=3, refill_interval_s=0)
        scheduler = JobScheduler(watched, dispatcher, fair=fair)
        large = start("large-shards", "l", 40)  # 10 records a shard, batches of 5
        await record(watched, large, 1)
        await scheduler.start_job(large)
        assert reads.limits == [3] and len(dispatcher.tasks) == 3
        await watched[SHARDS].update_one({"_id": "large-shards:0000"}, {"$set": {"state": ShardState.SUCCEEDED}})
        assert await fair.run_pass() == 1
        assert reads.limits == [3, 1]

        reads.limits.clear()
        small = start("small-shards", "s", 40, batch_size=100)  # bundles of 10
        await record(watched, small, 2)
        await scheduler.start_job(small)
        assert reads.limits == [3, 3 * 63]  # its room, then on for three bundles of up to 64
        assert dispatcher.tasks[-3:] == [[f"small-shards:{i:04d}" for i in range(first, first + 10)] for first in (0, 10, 20)]
    finally:
        await client.close()
