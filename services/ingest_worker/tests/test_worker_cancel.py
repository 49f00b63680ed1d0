"""Cooperative cancel in the worker, over real collections: a marked shard never starts, a
running one stops at its next batch boundary with the batch committed and the checkpoint kept."""

from collections.abc import Iterator

import pytest

from cairn_contracts.messages import RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, SHARDS
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import run_shard
from cairn_ingest_worker.store import WriteCounts
from cairn_runtime.log import log_context

MAX_ATTEMPTS = 3


@pytest.fixture(autouse=True)
def own_log_context() -> Iterator[None]:
    """run_shard binds the job and shard to the log context (a Celery task scopes it in the
    worker); here, outside any task, the test scopes it so nothing leaks into later tests."""
    with log_context(job_id=None, shard_key=None, correlation_id=None):
        yield



SPEC = {"pipeline": "synthetic", "params": {"count": 50}, "batch_size": 10, "target_collection": "out"}


def test_a_marked_shard_is_never_claimed(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", SPEC)
    key = seed_shard(db, "job", 0, 0, 50)
    db[SHARDS].update_one({"_id": key}, {"$set": {"cancel_requested": True}})

    assert ShardLeases(db[SHARDS], db[CHECKPOINTS], "w", 30).claim(key) is None
    assert ShardLeases(db[SHARDS], db[CHECKPOINTS], "w", 30).claim_next("job") is None
    assert db["out"].count_documents({}) == 0


def test_commit_reports_the_cancel_in_the_same_write(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", SPEC)
    key = seed_shard(db, "job", 0, 0, 50)
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "w", 30)
    claim = leases.claim(key)

    first = leases.commit(claim, 10, 10, WriteCounts(inserted=10, duplicate=0))
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cancel_requested": True}})
    second = leases.commit(claim, 20, 10, WriteCounts(inserted=10, duplicate=0))

    assert (first.stored, first.cancel_requested) == (True, False)
    assert (second.stored, second.cancel_requested) == (True, True)


def test_a_running_shard_stops_after_the_batch_that_sees_the_cancel(db, seed_job, seed_shard, shard_runner) -> None:
    seed_job(db, "job", SPEC)
    key = seed_shard(db, "job", 0, 0, 50)
    # The cancel arrives after the claim: only the checkpoint carries the mark the batch commit reads.
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cancel_requested": True}})

    outcome = run_shard(shard_runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "cancelled" and outcome.records == 10
    shard = db[SHARDS].find_one({"_id": key})
    checkpoint = db[CHECKPOINTS].find_one({"shard_key": key})
    assert shard["state"] == ShardState.CANCELLED and shard["taken_by"] is None
    assert (checkpoint["cursor"], checkpoint["records_done"], checkpoint["batches"]) == (10, 10, 1)
    assert db["out"].count_documents({}) == checkpoint["records_done"]  # no partial batch


def test_a_shard_whose_last_batch_sees_the_cancel_simply_succeeds(db, seed_job, seed_shard, shard_runner) -> None:
    seed_job(db, "job", {**SPEC, "params": {"count": 10}})
    key = seed_shard(db, "job", 0, 0, 10)
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cancel_requested": True}})

    outcome = run_shard(shard_runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded"  # all its work is done: nothing to stop
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.SUCCEEDED
