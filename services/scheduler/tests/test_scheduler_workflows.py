"""Workflows: the release of WAITING jobs (`after`, `params_from`, `on_dependency_failure`) against
the real store and broker. Each settle is one conditional update on `{_id, state: WAITING}`."""

import asyncio
import json
from typing import Any

import pytest

from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS, JobRecord
from cairn_contracts.tenancy import TENANTS, TenantQuotas
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.workflows import WAIT, Decision, DependencyRelease, MissingValue, decide, fill_params
from cairn_testkit.aio import drain

TENANT = "acme"
SPEC = {"pipeline": "synthetic", "params": {"count": 40}, "sharding": {"shards": 1}}


class NoDispatch:
    async def dispatch(self, task: Any, priority: int) -> None:
        raise AssertionError("nothing is dispatched in these tests")


@pytest.fixture
async def release(db, broker):
    await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    return DependencyRelease(db, broker.publisher)


async def seed(db, state: JobState, spec: dict[str, Any] | None = None, *, result: dict[str, Any] | None = None, created_at_ms: int | None = None) -> str:
    record = JobRecord.new(spec or SPEC, TENANT)
    document = record.to_document()
    document["state"] = str(state)
    if result is not None:
        document["result"] = result
    if created_at_ms is not None:
        document["created_at_ms"] = created_at_ms
    await db[JOBS].insert_one(document)
    return record.id


def waiting_spec(*after: str, **fields: Any) -> dict[str, Any]:
    return {**SPEC, "after": list(after), **fields}


async def finish(db, job_id: str, state: JobState, result: dict[str, Any] | None = None) -> None:
    await db[JOBS].update_one({"_id": job_id}, {"$set": {"state": str(state), "result": result or {"records_written": 0}}})


async def state_of(db, job_id: str) -> str:
    return (await db[JOBS].find_one({"_id": job_id}))["state"]


async def start_commands(broker) -> list[StartJob]:
    return [StartJob.model_validate(json.loads(m.body)) for m in await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])]


# --- the rule --------------------------------------------------------------------------------------
def test_decide_waits_starts_and_stops_by_policy() -> None:
    job = {"after": ["a", "b"], "spec": {}, "created_at_ms": 0}
    done, running, failed = {"state": "SUCCESS"}, {"state": "STARTED"}, {"state": "FAILURE"}
    assert decide(job, {"a": done, "b": running}, 10) == WAIT
    assert decide(job, {"a": done, "b": done}, 10) == Decision("start")
    stopped = decide(job, {"a": running, "b": failed}, 10)
    assert (stopped.action, stopped.state, stopped.failure["at"], stopped.failure["job_id"]) == ("stop", JobState.FAILURE, "after[1]", "b")
    assert decide({**job, "spec": {"on_dependency_failure": "skip"}}, {"a": failed, "b": done}, 10).state == JobState.CANCELLED
    run = {**job, "spec": {"on_dependency_failure": "run"}}
    assert decide(run, {"a": failed, "b": running}, 10) == WAIT  # `run` waits for every one to finish
    assert decide(run, {"a": failed, "b": {"state": "CANCELLED"}}, 10) == Decision("start")


def test_decide_gives_a_missing_dependency_a_grace_period_then_fails() -> None:
    job = {"after": ["gone"], "spec": {}, "created_at_ms": 1_000}
    assert decide(job, {}, 1_000 + 59_000) == WAIT
    late = decide(job, {}, 1_000 + 61_000)
    assert (late.state, late.failure["at"]) == (JobState.FAILURE, "after[0]") and "does not exist" in late.failure["reason"]


def test_fill_params_sets_nested_paths_and_names_a_missing_one() -> None:
    view = {"result": {"records_written": 40, "shards": [{"n": 1}]}, "target_collection": "staging"}
    filled = fill_params({"count": 1, "opts": {"x": 1}}, {"count": "result.records_written", "opts.source": "target_collection", "first": "result.shards.0.n"}, view)
    assert filled == {"count": 40, "opts": {"x": 1, "source": "staging"}, "first": 1}
    with pytest.raises(MissingValue, match="records_deleted"):
        fill_params({}, {"count": "result.records_deleted"}, view)


# --- against the store and broker ----------------------------------------------------------------
async def test_a_job_is_released_once_all_its_dependencies_succeeded(db, broker, release) -> None:
    first, second = await seed(db, JobState.STARTED), await seed(db, JobState.STARTED)
    waiting = await seed(db, JobState.WAITING, waiting_spec(first, second, params_from={"count": "result.records_written"}))

    await finish(db, first, JobState.SUCCESS, {"records_written": 7})
    assert await release.job_finished(first) == 0
    assert await state_of(db, waiting) == JobState.WAITING and await start_commands(broker) == []

    await finish(db, second, JobState.SUCCESS)
    assert await release.job_finished(second) == 1
    job = await db[JOBS].find_one({"_id": waiting})
    assert job["state"] == JobState.PENDING and job["command_published_at"] is not None and job["released_at_ms"]
    assert job["spec"]["params"]["count"] == 7  # from after[0]'s result
    assert job["space"]["end"] - job["space"]["start"] == 7  # the filled spec was checked and planned from the catalog
    (command,) = await start_commands(broker)
    assert (command.job_id, command.spec.params["count"]) == (waiting, 7)


async def test_a_failed_dependency_ends_its_dependents_and_theirs(db, broker, release) -> None:
    dependency = await seed(db, JobState.STARTED)
    child = await seed(db, JobState.WAITING, waiting_spec(dependency))
    grandchild = await seed(db, JobState.WAITING, waiting_spec(child))
    skipper = await seed(db, JobState.WAITING, waiting_spec(dependency, on_dependency_failure="skip"))
    runner = await seed(db, JobState.WAITING, waiting_spec(dependency, on_dependency_failure="run"))

    await finish(db, dependency, JobState.FAILURE)
    assert await release.job_finished(dependency) == 4

    failed = await db[JOBS].find_one({"_id": child})
    assert failed["state"] == JobState.FAILURE and failed["finished_at_ms"]
    assert failed["dependency_failure"] == {"at": "after[0]", "job_id": dependency, "state": "FAILURE", "reason": f"after[0]: job {dependency} ended FAILURE"}
    assert failed["result"]["dependency_failure"]["job_id"] == dependency
    cascaded = await db[JOBS].find_one({"_id": grandchild})
    assert cascaded["state"] == JobState.FAILURE and cascaded["dependency_failure"]["job_id"] == child
    assert await state_of(db, skipper) == JobState.CANCELLED
    assert await state_of(db, runner) == JobState.PENDING
    assert [c.job_id for c in await start_commands(broker)] == [runner]


async def test_two_schedulers_release_a_job_once(db, broker, release) -> None:
    dependency = await seed(db, JobState.SUCCESS)
    waiting = await seed(db, JobState.WAITING, waiting_spec(dependency))
    other = DependencyRelease(db, broker.publisher)

    outcomes = await asyncio.gather(*(r.settle(waiting) for r in (release, other, release, other)))

    assert outcomes.count(JobState.PENDING) == 1 and outcomes.count(None) == 3
    assert [c.job_id for c in await start_commands(broker)] == [waiting]
    assert await release.settle(waiting) is None  # settled: nothing more happens


async def test_the_sweep_releases_what_a_killed_scheduler_missed(db, broker, release) -> None:
    dependency = await seed(db, JobState.STARTED)
    waiting = await seed(db, JobState.WAITING, waiting_spec(dependency))
    failing = await seed(db, JobState.WAITING, waiting_spec(await seed(db, JobState.CANCELLED)))
    # The dependency's SUCCESS is written, and its scheduler dies before releasing anything.
    await finish(db, dependency, JobState.SUCCESS)

    assert await release.sweep() == 2

    assert await state_of(db, waiting) == JobState.PENDING
    assert await state_of(db, failing) == JobState.FAILURE
    assert [c.job_id for c in await start_commands(broker)] == [waiting]


async def test_params_the_catalog_refuses_fail_the_job_naming_the_param(db, broker, release) -> None:
    dependency = await seed(db, JobState.SUCCESS, result={"records_written": 5})
    waiting = await seed(db, JobState.WAITING, waiting_spec(dependency, params_from={"count": "name"}))  # the name is null
    missing = await seed(db, JobState.WAITING, waiting_spec(dependency, params_from={"count": "result.nope"}))

    assert await release.settle(waiting) == JobState.FAILURE
    assert await release.settle(missing) == JobState.FAILURE

    refused = (await db[JOBS].find_one({"_id": waiting}))["dependency_failure"]["reason"]
    assert refused.startswith(f"params_from of after[0] (job {dependency}): params.count")
    assert "'result.nope' is not in the dependency" in (await db[JOBS].find_one({"_id": missing}))["dependency_failure"]["reason"]
    assert await start_commands(broker) == []


async def test_the_scheduler_settles_on_start_job_and_releases_after_a_cancel(db, broker, release) -> None:
    scheduler = JobScheduler(db, NoDispatch(), dependents=release)
    dependency = await seed(db, JobState.SUCCESS)
    ready = await seed(db, JobState.WAITING, waiting_spec(dependency))
    # The gateway's StartJob of a WAITING job whose dependency finished before it was recorded.
    await scheduler.start_job(StartJob(job_id=ready, tenant=TENANT, spec=waiting_spec(dependency)))
    assert await state_of(db, ready) == JobState.PENDING

    # A cancelled WAITING job ends CANCELLED (nothing planned) and its dependents are settled.
    blocked = await seed(db, JobState.WAITING, waiting_spec(await seed(db, JobState.STARTED)))
    after_blocked = await seed(db, JobState.WAITING, waiting_spec(blocked))
    await db[JOBS].update_one({"_id": blocked}, {"$set": {"cancel_requested": True}})
    assert await release.settle(blocked) is None  # a cancel is on its way: not released
    assert await scheduler.stop(blocked) == JobState.CANCELLED
    assert await state_of(db, after_blocked) == JobState.FAILURE


class Recording:
    def __init__(self) -> None:
        self.tasks: list[Any] = []

    async def dispatch(self, task: Any, priority: int) -> None:
        self.tasks.append(task)


async def test_a_late_start_command_of_a_released_job_plans_its_filled_spec(db, broker, release) -> None:
    dispatcher = Recording()
    scheduler = JobScheduler(db, dispatcher, dependents=release)
    dependency = await seed(db, JobState.SUCCESS, result={"records_written": 7})
    submitted = waiting_spec(dependency, params_from={"count": "result.records_written"})
    waiting = await seed(db, JobState.WAITING, submitted)
    assert await release.settle(waiting) == JobState.PENDING

    # The gateway's StartJob (the spec as submitted, no count yet) is consumed after the release.
    await scheduler.start_job(StartJob(job_id=waiting, tenant=TENANT, spec=submitted))

    job = await db[JOBS].find_one({"_id": waiting})
    assert (job["state"], job["records_total"], job["spec"]["params"]["count"]) == (JobState.STARTED, 7, 7)
    assert len(dispatcher.tasks) == 1


async def test_a_cancel_marked_after_the_decision_wins_over_a_dependency_failure(db, broker, release) -> None:
    scheduler = JobScheduler(db, NoDispatch(), dependents=release)
    dependency = await seed(db, JobState.FAILURE)
    waiting = await seed(db, JobState.WAITING, waiting_spec(dependency))
    # The release read the job and decided to stop it; the gateway's cancel mark lands before its update.
    job = await db[JOBS].find_one({"_id": waiting})
    decision = decide(job, {dependency: {"state": "FAILURE"}}, job["created_at_ms"])
    await db[JOBS].update_one({"_id": waiting}, {"$set": {"cancel_requested": True}})

    assert await release._stop(job, decision) is None

    assert await state_of(db, waiting) == JobState.WAITING  # left to the cancel
    assert await scheduler.stop(waiting) == JobState.CANCELLED
    assert "dependency_failure" not in await db[JOBS].find_one({"_id": waiting})



async def test_params_from_cannot_point_a_job_at_a_control_collection(db, broker, release) -> None:
    # The dependency's name is one of Cairn's own collections; copied into a mongo_range source,
    # the release's catalog check refuses it as the gateway would at submit (no read of api_keys).
    dependency = await seed(db, JobState.SUCCESS, {**SPEC, "name": "api_keys"})
    reader = {"pipeline": "mongo_range", "params": {"key_field": "seq", "start": 0, "end": 10}, "sharding": {"shards": 1}}
    waiting = await seed(db, JobState.WAITING, {**reader, "after": [dependency], "params_from": {"collection": "name"}})

    assert await release.settle(waiting) == JobState.FAILURE

    job = await db[JOBS].find_one({"_id": waiting})
    assert "params.collection" in job["dependency_failure"]["reason"] and "Cairn's own collections" in job["dependency_failure"]["reason"]
    assert "collection" not in job["spec"]["params"] and await start_commands(broker) == []


async def test_params_from_cannot_carry_a_job_past_its_tenants_per_job_quotas(db, broker) -> None:
    # The gateway checks a params_from job's per-job quotas without its filled params (its key
    # space is unknown until release): the release checks them on the filled spec, with the
    # tenant's own quotas over the deployment's defaults.
    release = DependencyRelease(db, broker.publisher, defaults=TenantQuotas(max_shards_per_job=3))
    await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    await db[TENANTS].insert_one({"_id": TENANT, "quotas": {"max_records_per_job": 1000}})
    dependency = await seed(db, JobState.SUCCESS, result={"records_written": 5_000_000})
    records = await seed(db, JobState.WAITING, waiting_spec(dependency, params_from={"count": "result.records_written"}))
    fits = await seed(db, JobState.WAITING, waiting_spec(dependency, params_from={"count": "params.count"}))  # 40 records
    items = {"pipeline": "synthetic", "params": {"count": 40}, "sharding": {"strategy": "lease_frontier", "shards": 1, "item_size": 10}}
    frontier = await seed(db, JobState.WAITING, {**items, "after": [dependency], "params_from": {"count": "params.count"}})

    assert await release.settle(records) == JobState.FAILURE
    reason = (await db[JOBS].find_one({"_id": records}))["dependency_failure"]["reason"]
    assert "max_records_per_job" in reason and "params" in reason
    assert await release.settle(frontier) == JobState.FAILURE  # 4 work items over the default 3
    assert "max_shards_per_job" in (await db[JOBS].find_one({"_id": frontier}))["dependency_failure"]["reason"]
    assert await release.settle(fits) == JobState.PENDING
    assert [c.job_id for c in await start_commands(broker)] == [fits]
