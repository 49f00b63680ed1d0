"""A mongo_range source that does not exist is a permanent failure naming it, never an empty
success (issue 11, item 9); an existing empty source still is an empty success."""

import pytest

from cairn_contracts.messages import RunShard
from cairn_contracts.store import CHECKPOINTS
from cairn_ingest_worker.errors import NonRetryableError, is_retryable
from cairn_ingest_worker.pipelines import failure_policy
from cairn_ingest_worker.pipelines.mongo_range import MongoRangeParams, MongoRangePipeline, SourceNotFound
from cairn_ingest_worker.runner import ShardFailed, run_shard
from cairn_sdk import Bounds, RunContext


def mongo_range_spec(collection: str) -> dict:
    return {"pipeline": "mongo_range", "params": {"collection": collection, "start": 0, "end": 20}, "target_collection": "copy"}


def test_reading_a_missing_collection_raises_a_permanent_error_naming_it(mongo_db) -> None:
    pipeline = MongoRangePipeline(MongoRangeParams(collection="no_such_src", start=0, end=10), RunContext(source_db=mongo_db))

    with pytest.raises(SourceNotFound) as caught:
        pipeline.read(Bounds(0, 10), 0, 5)

    assert "'no_such_src'" in str(caught.value) and mongo_db.name in str(caught.value)
    assert isinstance(caught.value, NonRetryableError)
    assert not is_retryable(caught.value, failure_policy("mongo_range"))


def test_an_existing_empty_collection_is_an_empty_source(mongo_db) -> None:
    mongo_db.create_collection("empty_src")
    pipeline = MongoRangePipeline(MongoRangeParams(collection="empty_src", start=0, end=10), RunContext(source_db=mongo_db))

    batch = pipeline.read(Bounds(0, 10), 0, 5)

    assert batch.records == [] and batch.cursor == 10 and batch.done


def test_a_shard_over_a_missing_collection_fails_without_a_retry_and_stores_nothing(db, seed_job, seed_shard, shard_runner) -> None:
    seed_job(db, "job-missing", mongo_range_spec("vanished"))
    key = seed_shard(db, "job-missing", 0, 0, 20)

    with pytest.raises(ShardFailed) as caught:
        run_shard(shard_runner, RunShard(job_id="job-missing", shard_key=key), max_attempts=3)

    assert isinstance(caught.value.error, SourceNotFound)
    assert "'vanished'" in str(caught.value.error)
    assert db["copy"].count_documents({}) == 0
    checkpoint = db[CHECKPOINTS].find_one({"shard_key": key})
    assert checkpoint["cursor"] is None and checkpoint["batches"] == 0  # nothing read, nothing committed


def test_a_shard_over_an_existing_collection_still_succeeds(db, seed_job, seed_shard, shard_runner) -> None:
    db["present"].insert_many([{"_id": k} for k in range(5)])
    seed_job(db, "job-present", mongo_range_spec("present"))
    key = seed_shard(db, "job-present", 0, 0, 20)

    outcome = run_shard(shard_runner, RunShard(job_id="job-present", shard_key=key), max_attempts=3)

    assert outcome.kind == "succeeded" and outcome.records == 5
