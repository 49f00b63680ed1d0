"""run_shard over real collections: full run, re-run, resume from a checkpoint, poison, failures."""

from datetime import UTC, datetime

import pytest

from cairn_contracts.clock import now_ms
from cairn_contracts.messages import RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.errors import NonRetryableError, RetryableError
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import ShardFailed, ShardRunner, run_shard
from cairn_ingest_worker.store import store_records

MAX_ATTEMPTS = 3


def runner(db, worker: str = "worker-a", *, slice_s: float = 600) -> ShardRunner:
    return ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], worker, ttl_s=30),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,
        source_db=db,
        heartbeat_interval_s=5,
        slice_s=slice_s,
    )


def synthetic_spec(**params) -> dict:
    return {"pipeline": "synthetic", "params": {"count": 25, **params}, "batch_size": 10, "target_collection": "out"}


def checkpoint(db, key: str) -> dict:
    return db[CHECKPOINTS].find_one({"shard_key": key})


def stored_ids(db) -> list[str]:
    return sorted(d["_id"] for d in db["out"].find({}, {"_id": 1}))


def keys(start: int, end: int) -> list[str]:
    return [f"syn-{i:012d}" for i in range(start, end)]


def test_run_shard_processes_a_synthetic_shard_fully(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)

    outcome = run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded" and outcome.records == 25
    assert outcome.claim.token == 1
    cp = checkpoint(db, key)
    assert (cp["cursor"], cp["records_done"], cp["records_written"], cp["records_redone"], cp["batches"]) == (25, 25, 25, 0, 3)
    assert stored_ids(db) == keys(0, 25)
    assert db["out"].count_documents({"job_id": "job"}) == 25
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.SUCCEEDED


def test_run_shard_covers_only_its_own_range(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 1, 9, 17)

    outcome = run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.records == 8
    assert stored_ids(db) == keys(9, 17)


def test_running_a_finished_shard_again_is_not_claimable_and_stores_nothing(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)
    request = RunShard(job_id="job", shard_key=key)
    run_shard(runner(db), request, max_attempts=MAX_ATTEMPTS)
    checkpoint_before = checkpoint(db, key)

    again = run_shard(runner(db, "worker-b"), request, max_attempts=MAX_ATTEMPTS)

    assert again.kind == "not_claimable" and again.claim is None
    assert db["out"].count_documents({}) == 25
    assert checkpoint(db, key) == checkpoint_before


def test_resume_reads_only_what_is_left_after_the_checkpoint(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)
    # A worker stored the first two batches, checkpointed them, then died; the shard went back on the queue.
    store_records(db["out"], [{"_id": k, "seq": i} for i, k in enumerate(keys(0, 20))], "job")
    db[CHECKPOINTS].update_one(
        {"shard_key": key}, {"$set": {"cursor": 20, "records_done": 20, "records_written": 20, "batches": 2, "fencing_token": 1}}
    )
    db[SHARDS].update_one({"_id": key}, {"$set": {"state": ShardState.QUEUED, "fencing_token": 1, "attempts": 1}})

    outcome = run_shard(runner(db, "worker-b"), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded"
    assert outcome.records == 5  # only keys 20..24 were read
    cp = checkpoint(db, key)
    assert (cp["cursor"], cp["records_done"], cp["records_written"], cp["records_redone"], cp["batches"]) == (25, 25, 25, 0, 3)
    assert stored_ids(db) == keys(0, 25)


def test_resume_after_a_crash_between_store_and_checkpoint_stores_nothing_twice(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)
    # The second batch (10..19) was stored but its checkpoint was never written.
    store_records(db["out"], [{"_id": k, "seq": i} for i, k in enumerate(keys(0, 20))], "job")
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cursor": 10, "records_done": 10, "records_written": 10, "batches": 1}})

    outcome = run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.records == 15
    cp = checkpoint(db, key)
    assert (cp["records_done"], cp["records_written"], cp["records_redone"]) == (25, 15, 10)
    assert stored_ids(db) == keys(0, 25)


def test_a_shard_that_used_up_its_attempts_is_poison(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    # Every earlier attempt was claimed and then killed its worker: RUNNING, lease long expired.
    key = seed_shard(db, "job", 0, 0, 25, state=ShardState.RUNNING, attempts=MAX_ATTEMPTS)
    db[SHARDS].update_one({"_id": key}, {"$set": {"lease_until": now_ms() - 60_000, "fencing_token": MAX_ATTEMPTS}})

    outcome = run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "poison"
    assert outcome.claim is not None and outcome.claim.attempt == MAX_ATTEMPTS + 1
    assert db["out"].count_documents({}) == 0
    assert checkpoint(db, key)["cursor"] == 0


def test_last_allowed_attempt_still_runs(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25, state=ShardState.RETRY, attempts=MAX_ATTEMPTS - 1)

    assert run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS).kind == "succeeded"


def test_pipeline_error_raises_shard_failed_with_the_claim_after_the_good_batches(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec(fail_at_key=15))
    key = seed_shard(db, "job", 0, 0, 25)

    with pytest.raises(ShardFailed) as caught:
        run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    failure = caught.value
    assert isinstance(failure.error, NonRetryableError)
    assert failure.pipeline == "synthetic"
    assert failure.claim.shard_key == key and failure.claim.token == 1 and failure.claim.attempt == 1
    assert checkpoint(db, key)["cursor"] == 10  # the batch before the failure is kept
    assert stored_ids(db) == keys(0, 10)
    # the shard is still held: the task decides between retry and dead letter
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.RUNNING


def test_retryable_failure_passes_on_a_later_attempt(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec(fail_at_key=3, failure="retryable", fail_times=1))
    key = seed_shard(db, "job", 0, 0, 25)
    work = runner(db)

    with pytest.raises(ShardFailed) as caught:
        run_shard(work, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)
    assert isinstance(caught.value.error, RetryableError)
    assert work.leases.schedule_retry(caught.value.claim, "retry", datetime.now(UTC))

    outcome = run_shard(work, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)
    assert outcome.kind == "succeeded" and outcome.claim.attempt == 2
    assert stored_ids(db) == keys(0, 25)


def test_unknown_job_raises_shard_failed(db, seed_shard) -> None:
    key = seed_shard(db, "ghost", 0, 0, 5)

    with pytest.raises(ShardFailed) as caught:
        run_shard(runner(db), RunShard(job_id="ghost", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert isinstance(caught.value.error, LookupError)
    assert caught.value.claim.shard_key == key


def test_invalid_stored_params_raise_shard_failed(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    db[JOBS].update_one({"_id": "job"}, {"$set": {"spec.params.count": 0}})
    key = seed_shard(db, "job", 0, 0, 5)

    with pytest.raises(ShardFailed) as caught:
        run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert isinstance(caught.value.error, ValueError)


def test_mongo_range_shard_copies_the_source_once(db, seed_job, seed_shard) -> None:
    db["src"].insert_many([{"_id": k, "v": k} for k in range(40)] + [{"_id": "not-an-int", "v": -1}])
    seed_job(
        db,
        "job",
        {"pipeline": "mongo_range", "params": {"collection": "src", "start": 5, "end": 30}, "batch_size": 7, "target_collection": "copy"},
    )
    key = seed_shard(db, "job", 0, 5, 30)

    outcome = run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded" and outcome.records == 25
    copied = sorted(db["copy"].find(), key=lambda d: d["source_key"])
    assert [d["_id"] for d in copied] == [f"src:{k}" for k in range(5, 30)]
    assert [d["v"] for d in copied] == list(range(5, 30))
    assert checkpoint(db, key)["cursor"] == 30


def test_a_run_past_its_slice_hands_the_lease_off_and_the_next_run_continues(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)
    request = RunShard(job_id="job", shard_key=key)

    sliced = run_shard(runner(db, slice_s=0), request, max_attempts=MAX_ATTEMPTS)

    assert sliced.kind == "sliced" and sliced.records == 0
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == ShardState.RUNNING
    assert shard["lease_until"] == 0  # claimable at once by the continuation
    assert shard["attempts"] == 0 and shard["hand_offs"] == 1  # a slice is not a failed attempt

    outcome = run_shard(runner(db, "worker-b"), request, max_attempts=MAX_ATTEMPTS)
    assert outcome.kind == "succeeded" and outcome.records == 25
    assert outcome.claim.attempt == 1
    assert stored_ids(db) == keys(0, 25)


def test_hash_mod_buckets_store_each_record_exactly_once_between_them(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec(count=60))
    shard_keys = [seed_shard(db, "job", r, 0, 60) for r in range(3)]
    for remainder, key in enumerate(shard_keys):
        db[SHARDS].update_one({"_id": key}, {"$set": {"bucket": {"modulus": 3, "remainder": remainder}}})

    outcomes = [run_shard(runner(db), RunShard(job_id="job", shard_key=k), max_attempts=MAX_ATTEMPTS) for k in shard_keys]

    assert [o.kind for o in outcomes] == ["succeeded"] * 3
    assert sum(o.records for o in outcomes) == 60
    assert all(0 < o.records < 60 for o in outcomes)  # each bucket holds only its share
    assert stored_ids(db) == keys(0, 60)
    assert all(checkpoint(db, k)["cursor"] == 60 for k in shard_keys)
