"""Maintenance: the relay of unpublished commands (real Publisher in the test vhost) and the
reconciliation of running jobs."""

from datetime import UTC, datetime, timedelta
from typing import Any

from cairn_contracts.messages import RunShard, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import JOBS, SHARDS, JobRecord
from cairn_contracts.topology import HEADER_CORRELATION_ID, QUEUE_SCHEDULER_COMMANDS
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.maintenance import Maintenance
from cairn_scheduler.reaper import LeaseReaper
from cairn_testkit.aio import drain, next_message

SPEC = {"pipeline": "synthetic", "params": {"count": 20}, "priority": 4, "sharding": {"shards": 2}}


class NoDispatch:
    async def dispatch(self, task: RunShard, priority: int) -> None:
        pass


def maintenance(db: Any, publisher: Any) -> Maintenance:
    scheduler = JobScheduler(db, NoDispatch())
    return Maintenance(scheduler, publisher, LeaseReaper(db, NoDispatch()), relay_after_s=10, redispatch_after_s=300)


async def record_job(db: Any, job_id: str, *, age_s: float, published: bool = False, state: JobState = JobState.PENDING) -> None:
    """The job document as the gateway records it, `age_s` seconds old."""
    record = JobRecord.new(SPEC, "default", job_id=job_id, now=datetime.now(UTC) - timedelta(seconds=age_s))
    document = record.to_document()
    document.update(state=state, command_published_at=datetime.now(UTC) if published else None)
    await db[JOBS].insert_one(document)


async def test_relay_publishes_an_old_unpublished_job_and_marks_it(db, broker) -> None:
    await record_job(db, "job-old", age_s=60)
    relay = maintenance(db, broker.publisher)

    assert await relay.relay_unpublished() == 1

    message = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS])
    command = StartJob.model_validate_json(message.body)
    assert command.job_id == "job-old" and command.tenant == "default"
    assert command.spec.params["count"] == 20
    assert message.priority == 4
    assert message.headers[HEADER_CORRELATION_ID] == "job-old"
    job = await db[JOBS].find_one({"_id": "job-old"})
    assert job["command_published_at"] is not None
    assert job["state"] == JobState.PENDING


async def test_relay_publishes_each_job_once(db, broker) -> None:
    await record_job(db, "job-once", age_s=60)
    relay = maintenance(db, broker.publisher)

    assert await relay.relay_unpublished() == 1
    assert await relay.relay_unpublished() == 0

    assert len(await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])) == 1


async def test_relay_leaves_young_published_and_started_jobs_alone(db, broker) -> None:
    await record_job(db, "job-young", age_s=0)
    await record_job(db, "job-published", age_s=60, published=True)
    await record_job(db, "job-started", age_s=60, state=JobState.STARTED)
    relay = maintenance(db, broker.publisher)

    assert await relay.relay_unpublished() == 0

    assert await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS]) == []
    assert (await db[JOBS].find_one({"_id": "job-young"}))["command_published_at"] is None


async def test_reconcile_running_rolls_up_jobs_whose_events_were_lost(db, broker) -> None:
    scheduler = JobScheduler(db, NoDispatch())
    await record_job(db, "job-lost", age_s=60, published=True)
    await scheduler.start_job(StartJob.model_validate({"job_id": "job-lost", "tenant": "default", "spec": SPEC}))
    await db[SHARDS].update_many({"job_id": "job-lost"}, {"$set": {"state": ShardState.SUCCEEDED}})

    await maintenance(db, broker.publisher).reconcile_running()

    assert (await db[JOBS].find_one({"_id": "job-lost"}))["state"] == JobState.SUCCESS
