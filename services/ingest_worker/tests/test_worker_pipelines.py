"""The pipelines: synthetic (pure) and mongo_range (against the MongoDB-wire server)."""

import pytest

from cairn_contracts.pipelines import MongoRangeParams, SyntheticParams
from cairn_ingest_worker.errors import NonRetryableError, RetryableError
from cairn_ingest_worker.pipelines import Bucket, build_pipeline
from cairn_ingest_worker.pipelines.mongo_range import MongoRangePipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline


def synthetic(attempt: int = 1, **params) -> SyntheticPipeline:
    return SyntheticPipeline(SyntheticParams(**{"count": 100, **params}), attempt)


def test_synthetic_reads_the_keys_of_the_window_in_order() -> None:
    batch = synthetic(key_prefix="t").read(10, 100, 5)

    assert [r["_id"] for r in batch.records] == [f"t-{i:012d}" for i in range(10, 15)]
    assert [r["seq"] for r in batch.records] == [10, 11, 12, 13, 14]
    assert batch.next_cursor == 15


def test_synthetic_stops_at_the_shard_end() -> None:
    batch = synthetic().read(97, 100, 10)

    assert [r["seq"] for r in batch.records] == [97, 98, 99]
    assert batch.next_cursor == 100


def test_synthetic_records_are_deterministic_across_runs_and_attempts() -> None:
    first = [synthetic(attempt=1).clean(r) for r in synthetic(attempt=1).read(0, 50, 50).records]
    again = [synthetic(attempt=3).clean(r) for r in synthetic(attempt=3).read(0, 50, 50).records]

    assert first == again
    assert len({r["_id"] for r in first}) == 50


def test_synthetic_payload_has_the_requested_size_and_clean_adds_a_checksum() -> None:
    record = synthetic(record_size=37).read(0, 1, 1).records[0]

    assert len(record["payload"]) == 37
    cleaned = synthetic().clean(dict(record))
    assert isinstance(cleaned["checksum"], str) and len(cleaned["checksum"]) == 16


def test_synthetic_non_retryable_failure_at_the_key() -> None:
    pipeline = synthetic(fail_at_key=42, failure="non_retryable")

    with pytest.raises(NonRetryableError, match="42"):
        pipeline.read(40, 100, 5)
    # windows that do not contain the key read normally
    assert pipeline.read(30, 100, 12).next_cursor == 42
    assert pipeline.read(43, 100, 5).next_cursor == 48


def test_synthetic_failure_without_fail_times_happens_on_every_attempt() -> None:
    for attempt in (1, 2, 10):
        with pytest.raises(NonRetryableError):
            synthetic(attempt=attempt, fail_at_key=0).read(0, 100, 10)


@pytest.mark.parametrize("attempt, fails", [(1, True), (2, True), (3, False), (4, False)])
def test_synthetic_retryable_failure_respects_fail_times(attempt: int, fails: bool) -> None:
    pipeline = synthetic(attempt=attempt, fail_at_key=5, failure="retryable", fail_times=2)

    if fails:
        with pytest.raises(RetryableError, match=f"attempt {attempt}"):
            pipeline.read(0, 100, 10)
    else:
        assert len(pipeline.read(0, 100, 10).records) == 10


def test_build_pipeline_by_name(mongo_db) -> None:
    assert isinstance(build_pipeline("synthetic", {"count": 3}, attempt=1, source=mongo_db), SyntheticPipeline)
    assert isinstance(
        build_pipeline("mongo_range", {"collection": "src", "start": 0, "end": 5}, attempt=1, source=mongo_db),
        MongoRangePipeline,
    )
    with pytest.raises(ValueError, match="no pipeline named"):
        build_pipeline("shell", {}, attempt=1, source=mongo_db)


def test_build_pipeline_validates_the_params(mongo_db) -> None:
    with pytest.raises(ValueError):
        build_pipeline("synthetic", {"count": 0}, attempt=1, source=mongo_db)


# --- mongo_range -------------------------------------------------------------------------------


def mongo_range(db, **params) -> MongoRangePipeline:
    return MongoRangePipeline(MongoRangeParams(**{"collection": "src", "start": 0, "end": 1000, **params}), db)


def test_mongo_range_reads_the_range_in_key_order_in_batches(mongo_db) -> None:
    mongo_db["src"].insert_many([{"_id": k, "v": k * 10} for k in reversed(range(30))])
    pipeline = mongo_range(mongo_db)

    cursor, batches = 5, []
    while cursor < 17:
        batch = pipeline.read(cursor, 17, 4)
        batches.append([d["_id"] for d in batch.records])
        cursor = batch.next_cursor

    assert batches == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert cursor == 17


def test_mongo_range_next_cursor_follows_the_last_key_read_and_is_end_once_exhausted(mongo_db) -> None:
    mongo_db["src"].insert_many([{"_id": k} for k in (0, 10, 20, 30)])
    pipeline = mongo_range(mongo_db)

    first = pipeline.read(0, 25, 2)
    assert [d["_id"] for d in first.records] == [0, 10] and first.next_cursor == 11
    second = pipeline.read(first.next_cursor, 25, 2)
    assert [d["_id"] for d in second.records] == [20] and second.next_cursor == 25
    empty = pipeline.read(21, 25, 2)
    assert empty.records == [] and empty.next_cursor == 25


def test_mongo_range_reads_by_a_key_field_and_projects_the_fields(mongo_db) -> None:
    mongo_db["src"].insert_many([{"_id": f"doc-{k}", "seq": k, "a": k, "b": "secret"} for k in range(10)])
    pipeline = mongo_range(mongo_db, key_field="seq", fields=["a"])

    batch = pipeline.read(3, 6, 10)

    assert [(d["seq"], d["a"]) for d in batch.records] == [(3, 3), (4, 4), (5, 5)]
    assert all("b" not in d for d in batch.records)
    assert batch.next_cursor == 6


def test_mongo_range_clean_builds_the_id_from_collection_and_key(mongo_db) -> None:
    pipeline = mongo_range(mongo_db, key_field="seq")

    cleaned = pipeline.clean({"_id": "doc-7", "seq": 7, "a": 1})

    assert cleaned == {"_id": "src:7", "seq": 7, "a": 1, "source_key": 7}


@pytest.mark.parametrize("key", ["7", 7.5, True, None])
def test_mongo_range_clean_drops_records_without_an_int_key(mongo_db, key) -> None:
    record = {"_id": "doc", "a": 1} if key is None else {"_id": "doc", "seq": key}

    assert mongo_range(mongo_db, key_field="seq").clean(record) is None


def test_mongo_range_drops_a_fractional_key_read_from_the_source(mongo_db) -> None:
    mongo_db["src"].insert_many([{"_id": "x", "k": 3}, {"_id": "y", "k": 3.5}, {"_id": "z", "k": 4}])
    pipeline = mongo_range(mongo_db, key_field="k")

    batch = pipeline.read(0, 10, 10)
    cleaned = [c for c in map(pipeline.clean, batch.records) if c is not None]

    assert [c["_id"] for c in cleaned] == ["src:3", "src:4"]


# --- hash-mod buckets ----------------------------------------------------------------------------


def test_synthetic_bucket_reads_only_its_keys_and_the_buckets_partition_the_range() -> None:
    params = SyntheticParams(count=200)
    seen: list[int] = []
    for remainder in range(3):
        pipeline = SyntheticPipeline(params, 1, Bucket(3, remainder))
        cursor = 0
        while cursor < 200:
            batch = pipeline.read(cursor, 200, 7)
            assert len(batch.records) <= 7
            assert all(Bucket(3, remainder).holds(r["_id"]) for r in batch.records)
            assert batch.next_cursor > cursor
            seen.extend(r["seq"] for r in batch.records)
            cursor = batch.next_cursor

    assert sorted(seen) == list(range(200))


def test_synthetic_bucket_next_cursor_is_past_the_last_key_read() -> None:
    batch = SyntheticPipeline(SyntheticParams(count=100), 1, Bucket(4, 1)).read(0, 100, 2)

    assert len(batch.records) == 2
    assert batch.next_cursor == batch.records[-1]["seq"] + 1


def test_mongo_range_bucket_keeps_only_its_documents(mongo_db) -> None:
    mongo_db["src"].insert_many([{"_id": k} for k in range(50)])
    seen: list[int] = []
    for remainder in range(2):
        pipeline = MongoRangePipeline(MongoRangeParams(collection="src", start=0, end=50), mongo_db, Bucket(2, remainder))
        cursor = 0
        while cursor < 50:
            batch = pipeline.read(cursor, 50, 10)
            assert all(Bucket(2, remainder).holds(d["_id"]) for d in batch.records)
            seen.extend(d["_id"] for d in batch.records)
            cursor = batch.next_cursor

    assert sorted(seen) == list(range(50))
