"""The sink's write modes against the MongoDB-wire server: insert, upsert (content hash), replace_window."""

from typing import Any

import pytest
from pymongo.database import Database

from cairn_contracts.messages import RunShard
from cairn_contracts.sinks import CONTENT_HASH, RUN_MS, WINDOW, stale_filter
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import ShardRunner, run_shard
from cairn_ingest_worker.store import MissingIdentity, RunStamp, WriteCounts, content_hash, write_records


def records(keys, version: int = 0) -> list[dict[str, Any]]:
    return [{"_id": f"r-{k}", "value": k, "version": version, "tags": ["a", {"b": k}]} for k in keys]


def stored(db: Database) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d for d in db["out"].find()}


def test_the_content_hash_ignores_field_order_and_bookkeeping_but_not_types() -> None:
    base = {"_id": "x", "a": 1, "b": {"c": 2, "d": [1, 2]}}
    assert content_hash(base) == content_hash({"b": {"d": [1, 2], "c": 2}, "a": 1, "_id": "x"})
    assert content_hash(base) == content_hash({**base, "job_id": "j", "ingested_at": 1, CONTENT_HASH: "h", WINDOW: "w", RUN_MS: 5})
    assert content_hash(base) != content_hash({**base, "a": 1.0})
    assert content_hash(base) != content_hash({**base, "b": {"c": 2, "d": [2, 1]}})


def test_upsert_inserts_new_replaces_changed_and_leaves_unchanged_untouched(mongo_db) -> None:
    first = write_records(mongo_db["out"], records(range(10)), mode="upsert", run=RunStamp("job-1"))
    assert first == WriteCounts(inserted=10)
    before = stored(mongo_db)

    batch = records(range(10)) + records([10, 11])
    for record in batch[:3]:
        record["version"] = 1  # three changed at the source
    second = write_records(mongo_db["out"], batch, mode="upsert", run=RunStamp("job-2"))

    assert second == WriteCounts(inserted=2, updated=3, unchanged=7)
    after = stored(mongo_db)
    assert len(after) == 12
    assert [after[f"r-{k}"]["version"] for k in range(3)] == [1, 1, 1]
    assert all(after[f"r-{k}"]["job_id"] == "job-2" for k in (0, 1, 2, 10, 11))
    for k in range(3, 10):  # not rewritten: same write time, same job
        assert after[f"r-{k}"] == before[f"r-{k}"]


def test_upsert_of_the_same_batch_again_changes_nothing(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(5)), mode="upsert", run=RunStamp("job-1"))
    before = stored(mongo_db)

    again = write_records(mongo_db["out"], records(range(5)), mode="upsert", run=RunStamp("job-1"))

    assert again == WriteCounts(unchanged=5)
    assert stored(mongo_db) == before


def test_upsert_keeps_the_latest_version_of_an_identity_seen_twice_in_one_batch(mongo_db) -> None:
    batch = records([1]) + records([1], version=2)
    counts = write_records(mongo_db["out"], batch, mode="upsert", run=RunStamp("job-1"))
    assert counts == WriteCounts(inserted=1, duplicate=1)
    assert stored(mongo_db)["r-1"]["version"] == 2


def test_upsert_rewrites_a_record_stored_without_a_hash(mongo_db) -> None:
    mongo_db["out"].insert_one({"_id": "r-1", "value": 1, "version": 0, "tags": ["a", {"b": 1}]})
    counts = write_records(mongo_db["out"], records([1]), mode="upsert", run=RunStamp("job-1"))
    assert counts == WriteCounts(updated=1)
    assert stored(mongo_db)["r-1"][CONTENT_HASH] == content_hash(records([1])[0])


def test_upsert_needs_the_identity_of_every_record(mongo_db) -> None:
    with pytest.raises(MissingIdentity):
        write_records(mongo_db["out"], [{"value": 1}], mode="upsert", run=RunStamp("job-1"))


def test_upsert_counts_an_insert_refused_by_a_unique_key_as_a_duplicate(mongo_db) -> None:
    # As when another writer inserts the identity between the sink's find and its write.
    mongo_db["out"].create_index("value", unique=True)
    mongo_db["out"].insert_one({"_id": "other", "value": 1})
    counts = write_records(mongo_db["out"], records(range(3)), mode="upsert", run=RunStamp("job-1"))
    assert counts == WriteCounts(inserted=2, duplicate=1)
    assert mongo_db["out"].count_documents({}) == 3


def test_insert_keeps_the_first_version_and_counts_the_rest_as_duplicates(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(3)), mode="insert", run=RunStamp("job-1"))
    counts = write_records(mongo_db["out"], records(range(5), version=1), mode="insert", run=RunStamp("job-2"))
    assert counts == WriteCounts(inserted=2, duplicate=3)
    assert [stored(mongo_db)[f"r-{k}"]["version"] for k in range(5)] == [0, 0, 0, 1, 1]


def test_replace_window_stamps_every_record_and_a_later_run_leaves_only_its_own(mongo_db) -> None:
    old = RunStamp("job-1", run_ms=1_000, window="w")
    assert write_records(mongo_db["out"], records(range(10)), mode="replace_window", run=old) == WriteCounts(inserted=10)
    mongo_db["out"].insert_one({"_id": "other", "value": 0})  # not in the window: never deleted
    new = RunStamp("job-2", run_ms=2_000, window="w")

    batch = records(range(3, 10))  # 0..2 are gone from the source
    batch[0]["version"] = 1
    counts = write_records(mongo_db["out"], batch, mode="replace_window", run=new)

    assert counts == WriteCounts(updated=1, unchanged=6)
    assert all(d[RUN_MS] == 2_000 and d[WINDOW] == "w" for k, d in stored(mongo_db).items() if k in {f"r-{i}" for i in range(3, 10)})
    assert mongo_db["out"].delete_many(stale_filter("w", new.run_ms)).deleted_count == 3
    assert sorted(stored(mongo_db)) == sorted(["other", *(f"r-{k}" for k in range(3, 10))])
    assert mongo_db["out"].delete_many(stale_filter("w", new.run_ms)).deleted_count == 0  # idempotent


def test_an_older_run_still_writing_never_lowers_a_newer_runs_stamp(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(3)), mode="replace_window", run=RunStamp("new", run_ms=2_000, window="w"))
    write_records(mongo_db["out"], records(range(3)), mode="replace_window", run=RunStamp("old", run_ms=1_000, window="w"))
    assert {d[RUN_MS] for d in mongo_db["out"].find()} == {2_000}
    assert mongo_db["out"].delete_many(stale_filter("w", 2_000)).deleted_count == 0


def test_replace_window_claims_an_unchanged_record_of_another_window(mongo_db) -> None:
    write_records(mongo_db["out"], records([1]), mode="upsert", run=RunStamp("job-1"))
    counts = write_records(mongo_db["out"], records([1]), mode="replace_window", run=RunStamp("job-2", run_ms=5, window="w"))
    assert counts == WriteCounts(unchanged=1)
    assert (stored(mongo_db)["r-1"][WINDOW], stored(mongo_db)["r-1"][RUN_MS]) == ("w", 5)


def test_nothing_to_write_is_nothing(mongo_db) -> None:
    for mode in ("insert", "upsert", "replace_window"):
        assert write_records(mongo_db["out"], [], mode=mode, run=RunStamp("j", window="w")) == WriteCounts()  # type: ignore[arg-type]


def test_a_batch_redone_after_its_commit_was_lost_is_counted_as_its_lost_write_was(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(3)), mode="upsert", run=RunStamp("job-1", batch="job-1:0000#0"))

    def batch() -> list[dict[str, Any]]:
        fresh = records(range(5))
        fresh[0]["version"] = 1  # changed at the source since job-1
        return fresh

    run = RunStamp("job-2", batch="job-2:0000#4")
    lost = write_records(mongo_db["out"], batch(), mode="upsert", run=run)  # stored, never committed
    assert lost == WriteCounts(inserted=2, updated=1, unchanged=2)

    redone = write_records(mongo_db["out"], batch(), mode="upsert", run=run)  # the next claim's redo
    assert redone == lost

    # The same content seen again by a later batch (or another job) is unchanged, not re-counted.
    assert write_records(mongo_db["out"], batch(), mode="upsert", run=RunStamp("job-2", batch="job-2:0000#5")) == WriteCounts(unchanged=5)
    assert write_records(mongo_db["out"], batch(), mode="upsert", run=RunStamp("job-3", batch="job-2:0000#4")) == WriteCounts(unchanged=5)


# --- through the runner: counters of an upsert job stay exact when a commit is lost -------------


class Killed(BaseException):
    """The worker dies (no handler runs) right after a batch was stored, before its commit."""


class DiesAtSecondCommit(ShardLeases):
    commits = 0

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        type(self).commits += 1
        if type(self).commits == 2:
            raise Killed
        return super().commit(*args, **kwargs)


def shard_runner(db: Database, leases: ShardLeases) -> ShardRunner:
    return ShardRunner(
        leases=leases, jobs=db[JOBS], shards=db[SHARDS], records_db=db, source_db=db, heartbeat_interval_s=5, slice_s=600
    )


def test_an_upsert_shard_redoing_a_batch_whose_commit_was_lost_counts_each_record_once(db, seed_job, seed_shard) -> None:
    seed_job(db, "up", {"pipeline": "synthetic", "params": {"count": 25}, "batch_size": 10, "target_collection": "out", "write_mode": "upsert"})
    key = seed_shard(db, "up", 0, 0, 25)
    with pytest.raises(Killed):
        run_shard(shard_runner(db, DiesAtSecondCommit(db[SHARDS], db[CHECKPOINTS], "a", ttl_s=30)), RunShard(job_id="up", shard_key=key), max_attempts=5)
    assert db["out"].count_documents({}) == 20  # the second batch is stored, its commit lost
    db[SHARDS].update_one({"_id": key}, {"$set": {"lease_until": 1}})  # the dead worker's lease expired

    outcome = run_shard(shard_runner(db, ShardLeases(db[SHARDS], db[CHECKPOINTS], "b", ttl_s=30)), RunShard(job_id="up", shard_key=key), max_attempts=5)

    assert outcome.kind == "succeeded"
    cp = db[CHECKPOINTS].find_one({"shard_key": key})
    assert (cp["records_inserted"], cp["records_updated"], cp["records_unchanged"], cp["records_duplicate"]) == (25, 0, 0, 0)
    assert db["out"].count_documents({}) == 25
