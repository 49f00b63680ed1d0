"""Issue 14: a job's status and summary are read from its one document, whatever its shard
count; its shards are listed a page at a time. JobService against this run's MongoDB-wire server
(a client with a command listener: what the status reads is observed, not assumed) and Redis."""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient, monitoring

from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS, JobRecord, ShardRecord
from cairn_contracts.tenancy import TenantQuotas
from cairn_gateway.jobs import InvalidCursor, JobService
from cairn_gateway.tenants import TenantService
from cairn_runtime.mongo import ensure_indexes

SHARDS_IN_JOB = 300


class Reads(monitoring.CommandListener):
    def __init__(self) -> None:
        self.collections: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        if isinstance(target, str):
            self.collections.append(target)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def service(test_env, mongo_client) -> AsyncIterator[tuple[JobService, Reads, Any]]:
    name = f"{test_env.mongodb_database}_status_{uuid.uuid4().hex[:6]}"
    reads = Reads()
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, event_listeners=[reads], tz_aware=True)
    cache = aioredis.from_url(test_env.redis_url)
    db = client[name]
    await ensure_indexes(db)
    jobs = JobService(
        db=db, publisher=None, cache=cache, cache_prefix=test_env.redis_prefix, cache_ttl_s=0, result_ttl_s=3600,  # type: ignore[arg-type]
        tenants=TenantService(db, TenantQuotas()),
    )
    try:
        yield jobs, reads, mongo_client[name]
    finally:
        await cache.aclose()
        await client.close()
        mongo_client.drop_database(name)


def running_job(sync_db: Any) -> str:
    """A STARTED job of SHARDS_IN_JOB shards, as the scheduler leaves it: counters for the ended
    shards, a snapshot for the others; every shard and checkpoint recorded too."""
    record = JobRecord.new({"pipeline": "synthetic", "params": {"count": SHARDS_IN_JOB * 10}, "sharding": {"shards": SHARDS_IN_JOB}}, "acme")
    document = record.to_document() | {
        "state": JobState.STARTED,
        "shard_count": SHARDS_IN_JOB,
        "records_total": SHARDS_IN_JOB * 10,
        "weight_total": SHARDS_IN_JOB * 10,
        "counts": {"shards_succeeded": 100, "records_done": 1000, "weight_done": 1000, "batches": 100},
        "ledger": {"b0": "100|100|0|0|1000|0|0|0|0|0|0|100|1000"},  # the snapshot of its one ledger bucket
        "shard_states": {ShardState.SUCCEEDED: 90, ShardState.RUNNING: 2, ShardState.QUEUED: 208},
        "progress": {"percent": 30.1, "records_done": 905, "at_ms": 0},
    }
    sync_db[JOBS].insert_one(document)
    shards = [
        ShardRecord(shard_key=f"{record.id}:{i:04d}", job_id=record.id, index=i, strategy="range", range_start=i * 10,
                    range_end=i * 10 + 10, records_estimate=10, priority=2, state=ShardState.SUCCEEDED if i < 100 else ShardState.QUEUED)
        for i in range(SHARDS_IN_JOB)
    ]
    sync_db[SHARDS].insert_many([s.to_document() for s in shards])
    sync_db[CHECKPOINTS].insert_many([s.checkpoint().to_document() for s in shards])
    return record.id


async def test_status_reads_the_job_document_only(service) -> None:
    jobs, reads, sync_db = service
    job_id = running_job(sync_db)

    reads.collections.clear()
    status = await jobs.status("acme", job_id)

    assert reads.collections == [JOBS]  # one read: no shard, no checkpoint
    assert status.state == JobState.STARTED
    assert (status.shards.total, status.shards.succeeded, status.shards.running, status.shards.queued) == (300, 100, 2, 198)
    assert status.progress == 33.33  # the counted shards (100 of 300) are ahead of the snapshot's 30.1
    assert status.records_done == 1000


async def test_job_summary_reads_one_page_of_shards(service) -> None:
    jobs, reads, sync_db = service
    job_id = running_job(sync_db)

    reads.collections.clear()
    first = await jobs.get("acme", job_id, shard_limit=40)

    assert reads.collections == [JOBS, SHARDS, CHECKPOINTS]
    assert [s.index for s in first.shards] == list(range(40)) and first.shards_truncated
    assert first.progress == 33.33 and first.records_done == 1000
    seen = [s.index for s in first.shards]
    cursor = first.shards_next_cursor
    while cursor:
        page = await jobs.get("acme", job_id, shard_limit=128, shards_after=cursor)
        seen += [s.index for s in page.shards]
        cursor = page.shards_next_cursor
    assert seen == list(range(SHARDS_IN_JOB))
    with pytest.raises(InvalidCursor):
        await jobs.get("acme", job_id, shard_limit=10, shards_after="bm90LWEtY3Vyc29y")
