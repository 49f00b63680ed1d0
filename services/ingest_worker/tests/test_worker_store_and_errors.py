"""write_records in insert mode (exactly-once effect), is_retryable and backoff_delay."""

import random

import pytest
from bson.errors import InvalidDocument
from pymongo.errors import AutoReconnect, DuplicateKeyError, NetworkTimeout, ServerSelectionTimeoutError

from cairn_ingest_worker.errors import NonRetryableError, RetryableError, is_retryable
from cairn_ingest_worker.runner import backoff_delay
from cairn_ingest_worker.store import RunStamp, write_records


def records(keys) -> list[dict]:
    return [{"_id": f"r-{k}", "value": k} for k in keys]


def test_insert_mode_writes_new_records_with_job_and_time(mongo_db) -> None:
    result = write_records(mongo_db["out"], records(range(5)), mode="insert", run=RunStamp("job-1"))

    assert (result.written, result.duplicate) == (5, 0)
    stored = list(mongo_db["out"].find().sort("value", 1))
    assert [d["_id"] for d in stored] == [f"r-{k}" for k in range(5)]
    assert all(d["job_id"] == "job-1" and d["ingested_at"] is not None for d in stored)


def test_insert_mode_counts_a_rerun_batch_as_duplicates_and_writes_nothing_twice(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(5)), mode="insert", run=RunStamp("job-1"))

    result = write_records(mongo_db["out"], records(range(3, 8)), mode="insert", run=RunStamp("job-1"))

    assert (result.written, result.duplicate) == (3, 2)
    assert mongo_db["out"].count_documents({}) == 8
    assert sorted(d["_id"] for d in mongo_db["out"].find()) == sorted(f"r-{k}" for k in range(8))


def test_insert_mode_of_a_fully_stored_batch_writes_nothing(mongo_db) -> None:
    write_records(mongo_db["out"], records(range(4)), mode="insert", run=RunStamp("job-1"))
    before = list(mongo_db["out"].find().sort("_id", 1))

    result = write_records(mongo_db["out"], records(range(4)), mode="insert", run=RunStamp("job-2"))

    assert (result.written, result.duplicate) == (0, 4)
    assert list(mongo_db["out"].find().sort("_id", 1)) == before  # first write wins, untouched


def test_insert_mode_of_nothing_is_nothing(mongo_db) -> None:
    result = write_records(mongo_db["out"], [], mode="insert", run=RunStamp("job-1"))
    assert (result.written, result.duplicate) == (0, 0)
    assert mongo_db["out"].count_documents({}) == 0


@pytest.mark.parametrize(
    "error",
    [
        RetryableError("x"),
        ConnectionError("x"),
        TimeoutError("x"),
        AutoReconnect("x"),
        NetworkTimeout("x"),
        ServerSelectionTimeoutError("x"),
        RuntimeError("unknown trouble"),
        DuplicateKeyError("not a batch duplicate"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_and_unknown_errors_are_retryable(error: BaseException) -> None:
    assert is_retryable(error) is True


@pytest.mark.parametrize(
    "error",
    [NonRetryableError("x"), ValueError("x"), TypeError("x"), KeyError("x"), AttributeError("x"), InvalidDocument("key 'a\\x00b'")],
    ids=lambda e: type(e).__name__,
)
def test_bad_input_and_programming_errors_are_not_retryable(error: BaseException) -> None:
    assert is_retryable(error) is False


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 8, 30])
def test_backoff_delay_is_full_jitter_within_the_exponential_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(60.0, 0.5 * 2 ** max(0, attempt - 1))

    delays = [backoff_delay(attempt, 0.5, 60.0, rng) for _ in range(500)]

    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling / 2  # jitter spreads over the whole window, not a constant
    assert len(set(delays)) > 1


def test_backoff_delay_is_reproducible_with_a_seeded_rng() -> None:
    assert [backoff_delay(3, 1.0, 10.0, random.Random(7)) for _ in range(3)] == [
        backoff_delay(3, 1.0, 10.0, random.Random(7)) for _ in range(3)
    ]


def test_backoff_delay_is_capped_by_max() -> None:
    rng = random.Random(1)

    assert all(backoff_delay(50, 1.0, 2.5, rng) <= 2.5 for _ in range(200))
    assert backoff_delay(4, 1.0, 0.0, rng) == 0.0
