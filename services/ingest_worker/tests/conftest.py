import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo.database import Database

from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, DEFAULT_TENANT, JOBS, SHARDS, JobRecord, ShardRecord
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import ShardRunner
from cairn_runtime.mongo import ensure_indexes_sync


@pytest.fixture
def db(mongo_db: Database) -> Database:
    """A fresh database with Cairn's indexes, as the worker finds it at start-up."""
    ensure_indexes_sync(mongo_db)
    return mongo_db


@pytest.fixture
def shard_runner(db: Database) -> ShardRunner:
    """The runner of worker "worker-a" over `db` (records and sources in it too): 30 s leases,
    a heartbeat every 5 s, a 600 s slice."""
    return ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,
        source_db=db,
        heartbeat_interval_s=5,
        slice_s=600,
    )


# --- documents as the scheduler and the gateway record them (their models in cairn_contracts.store)


def _seed_shard(
    db: Database,
    job_id: str,
    index: int,
    start: int,
    end: int,
    *,
    state: ShardState = ShardState.QUEUED,
    attempts: int = 0,
    job_created_at_ms: int | None = None,
) -> str:
    shard = ShardRecord(
        shard_key=f"{job_id}:{index:04d}",
        job_id=job_id,
        index=index,
        strategy="range",
        range_start=start,
        range_end=end,
        records_estimate=end - start,
        priority=2,
        state=state,
        attempts=attempts,
        job_created_at_ms=job_created_at_ms,
    )
    db[CHECKPOINTS].insert_one(shard.checkpoint().to_document())
    db[SHARDS].insert_one(shard.to_document())
    return shard.shard_key


def _seed_job(db: Database, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    record = JobRecord.new(spec, DEFAULT_TENANT, job_id=job_id).model_copy(update={"state": JobState.STARTED})
    document = record.to_document()
    db[JOBS].insert_one(document)
    return document


@pytest.fixture
def seed_shard() -> Callable[..., str]:
    """seed_shard(db, job_id, index, start, end, *, state=QUEUED, attempts=0, job_created_at_ms=None) -> the shard key"""
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
