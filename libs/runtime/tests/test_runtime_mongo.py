"""The shared indexes, created on a fresh database of the MongoDB-wire server."""

from datetime import UTC, datetime

import pytest
from pymongo.errors import BulkWriteError, DuplicateKeyError

from cairn_contracts.store import CHECKPOINTS, DEDUP, INDEXES, JOBS, SHARDS
from cairn_runtime.mongo import Inserted, async_client, ensure_indexes, ensure_indexes_sync, insert_new, insert_new_sync


async def test_ensure_indexes_makes_task_key_unique(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[SHARDS].insert_one({"_id": "a", "shard_key": "job:0000"})

    with pytest.raises(DuplicateKeyError):
        await async_mongo_db[SHARDS].insert_one({"_id": "b", "shard_key": "job:0000"})
    assert await async_mongo_db[SHARDS].count_documents({}) == 1


async def test_ensure_indexes_makes_checkpoint_cursor_unique_per_shard_and_sub_key(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[CHECKPOINTS].insert_one({"_id": "1", "shard_key": "s", "sub_key": "main"})
    await async_mongo_db[CHECKPOINTS].insert_one({"_id": "2", "shard_key": "s", "sub_key": "other"})

    with pytest.raises(DuplicateKeyError):
        await async_mongo_db[CHECKPOINTS].insert_one({"_id": "3", "shard_key": "s", "sub_key": "main"})


async def test_ensure_indexes_makes_dedup_fingerprints_unique(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[DEDUP].insert_one({"task_fingerprint": "f1"})

    with pytest.raises(DuplicateKeyError):
        await async_mongo_db[DEDUP].insert_one({"task_fingerprint": "f1"})


async def test_idempotency_key_is_unique_per_tenant(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[JOBS].insert_one({"_id": "1", "tenant": "t1", "idempotency_key": "k"})
    await async_mongo_db[JOBS].insert_one({"_id": "2", "tenant": "t2", "idempotency_key": "k"})

    with pytest.raises(DuplicateKeyError):
        await async_mongo_db[JOBS].insert_one({"_id": "3", "tenant": "t1", "idempotency_key": "k"})


async def test_jobs_without_an_idempotency_key_do_not_collide(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)

    for job_id in ("1", "2", "3"):
        await async_mongo_db[JOBS].insert_one({"_id": job_id, "tenant": "t1"})
    assert await async_mongo_db[JOBS].count_documents({"tenant": "t1"}) == 3


async def test_ensure_indexes_is_idempotent(async_mongo_db) -> None:
    await ensure_indexes(async_mongo_db)
    await ensure_indexes(async_mongo_db)
    await async_mongo_db[SHARDS].insert_one({"_id": "a", "shard_key": "k"})

    with pytest.raises(DuplicateKeyError):
        await async_mongo_db[SHARDS].insert_one({"_id": "b", "shard_key": "k"})


def test_ensure_indexes_sync_creates_the_same_unique_indexes(mongo_db) -> None:
    ensure_indexes_sync(mongo_db)
    ensure_indexes_sync(mongo_db)
    mongo_db[SHARDS].insert_one({"_id": "a", "shard_key": "k"})

    with pytest.raises(DuplicateKeyError):
        mongo_db[SHARDS].insert_one({"_id": "b", "shard_key": "k"})
    indexed = {tuple(k for k, _ in info["key"]) for info in mongo_db[SHARDS].index_information().values()}
    expected = {tuple(k for k, _ in spec.keys) for spec in INDEXES if spec.collection == SHARDS}
    assert expected <= indexed


async def test_async_client_returns_timezone_aware_datetimes(test_env, mongo_db) -> None:
    client = async_client(test_env.mongodb_uri)
    try:
        await client[mongo_db.name]["t"].insert_one({"_id": 1, "at": datetime(2026, 1, 1, tzinfo=UTC)})
        document = await client[mongo_db.name]["t"].find_one({"_id": 1})
    finally:
        await client.close()
    assert document["at"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert document["at"].tzinfo is not None


async def test_insert_new_skips_and_counts_documents_already_there(async_mongo_db) -> None:
    collection = async_mongo_db["insert_new"]
    assert await insert_new(collection, [{"_id": i} for i in range(3)]) == Inserted(3, 0)
    assert await insert_new(collection, [{"_id": i, "again": True} for i in range(1, 5)]) == Inserted(2, 2)
    assert await insert_new(collection, []) == Inserted(0, 0)
    assert await collection.count_documents({}) == 5
    assert await collection.count_documents({"again": True}) == 2  # the ones already there were left as they were


def test_insert_new_sync_counts_duplicates_of_any_unique_index(mongo_db) -> None:
    collection = mongo_db["insert_new"]
    collection.create_index("n", unique=True)
    assert insert_new_sync(collection, [{"_id": 1, "n": 1}]) == Inserted(1, 0)
    assert insert_new_sync(collection, [{"_id": 9, "n": 1}, {"_id": 2, "n": 2}]) == Inserted(1, 1)


class RefusingCollection:
    """insert_many fails on one document with a duplicate key and on another with a validation error."""

    def insert_many(self, documents, ordered: bool = True):
        raise BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 121}], "nInserted": 1})


def test_insert_new_raises_any_write_error_but_a_duplicate_key() -> None:
    with pytest.raises(BulkWriteError):
        insert_new_sync(RefusingCollection(), [{"_id": 1}, {"_id": 2}, {"_id": 3}])  # type: ignore[arg-type]
