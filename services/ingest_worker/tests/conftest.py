import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import TypeAdapter
from pymongo.database import Database

from cairn_contracts.jobs import JobSpec
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, MAIN_SUB_KEY, SHARDS
from cairn_runtime.mongo import ensure_indexes_sync


@pytest.fixture
def db(mongo_db: Database) -> Database:
    """A fresh database with Cairn's indexes, as the worker finds it at start-up."""
    ensure_indexes_sync(mongo_db)
    return mongo_db


# --- documents as the scheduler and the gateway record them ------------------------------------
# (mirrors cairn_scheduler.jobs.JobScheduler._record_shards: services share no code)

_SPEC = TypeAdapter(JobSpec)


def _seed_shard(
    db: Database,
    job_id: str,
    index: int,
    start: int,
    end: int,
    *,
    state: ShardState = ShardState.QUEUED,
    attempts: int = 0,
) -> str:
    key = f"{job_id}:{index:04d}"
    now = datetime.now(UTC)
    db[CHECKPOINTS].insert_one(
        {
            "_id": f"{key}/{MAIN_SUB_KEY}",
            "shard_key": key,
            "sub_key": MAIN_SUB_KEY,
            "job_id": job_id,
            "cursor": start,
            "range_start": start,
            "range_end": end,
            "records_done": 0,
            "records_written": 0,
            "records_redone": 0,
            "batches": 0,
            "fencing_token": 0,
            "updated_at": now,
        }
    )
    db[SHARDS].insert_one(
        {
            "_id": key,
            "task_key": key,
            "job_id": job_id,
            "index": index,
            "strategy": "range",
            "range_start": start,
            "range_end": end,
            "records_total": end - start,
            "priority": 2,
            "state": state,
            "attempts": attempts,
            "fencing_token": 0,
            "lease_until": None,
            "taken_by": None,
            "created_at": now,
        }
    )
    return key


def _seed_job(db: Database, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    validated = _SPEC.validate_python(spec)
    document = {
        "_id": job_id,
        "tenant": "default",
        "pipeline": validated.pipeline,
        "priority": int(validated.priority),
        "spec": validated.model_dump(mode="json"),
        "state": JobState.STARTED,
        "created_at": datetime.now(UTC),
    }
    db[JOBS].insert_one(document)
    return document


@pytest.fixture
def seed_shard() -> Callable[..., str]:
    """seed_shard(db, job_id, index, start, end, *, state=QUEUED, attempts=0) -> the shard key"""
    return _seed_shard


@pytest.fixture
def seed_job() -> Callable[..., dict[str, Any]]:
    """seed_job(db, job_id, spec) -> the recorded job document (state STARTED)"""
    return _seed_job


@pytest.fixture
def amqp_url(test_env) -> Iterator[str]:
    """A RabbitMQ vhost of this test's own, with Cairn's topology declared; its URL."""
    from kombu import Connection

    from cairn_ingest_worker.publisher import declare_topology
    from cairn_testkit.fixtures import AMQP_HOST
    from cairn_testkit.servers import rabbitmq_vhost

    with rabbitmq_vhost(f"cairn-test-{test_env.run_id}-{uuid.uuid4().hex[:8]}") as vhost:
        url = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
        with Connection(url) as connection:
            declare_topology(connection)
        yield url
