"""run_shard over real collections: full run, re-run, resume from a checkpoint, poison, failures."""

from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from cairn_contracts.clock import now_ms
from cairn_contracts.messages import RunShard
from cairn_contracts.sinks import CHECKPOINT_COUNTERS
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker import pipelines
from cairn_ingest_worker.errors import CursorNotAdvanced, NonRetryableError, RetryableError, is_retryable
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.runner import ShardFailed, ShardRunner, run_shard
from cairn_ingest_worker.store import RunStamp, write_records
from cairn_sdk import Batch, Bounds, Pipeline, Single, WorkItems

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
    write_records(db["out"], [{"_id": k, "seq": i} for i, k in enumerate(keys(0, 20))], mode="insert", run=RunStamp("job"))
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


def test_a_succeeded_shard_carries_its_checkpoints_counters_resumed_or_not(db, seed_job, seed_shard) -> None:
    """What the scheduler counts into the job without reading the checkpoint (cairn_runtime.tally)."""
    seed_job(db, "job", synthetic_spec())
    fresh, resumed = seed_shard(db, "job", 0, 0, 12), seed_shard(db, "job", 1, 12, 25)
    db[CHECKPOINTS].update_one(  # an earlier run stored and committed 12..19, then died
        {"shard_key": resumed}, {"$set": {"cursor": 20, "records_done": 8, "records_written": 8, "batches": 1, "fencing_token": 1}}
    )
    db[SHARDS].update_one({"_id": resumed}, {"$set": {"fencing_token": 1, "attempts": 1}})

    for key in (fresh, resumed):
        assert run_shard(runner(db), RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS).kind == "succeeded"
        cp, shard = checkpoint(db, key), db[SHARDS].find_one({"_id": key})
        assert shard["totals"] == {counter: int(cp.get(counter) or 0) for counter in CHECKPOINT_COUNTERS}
    assert db[SHARDS].find_one({"_id": resumed})["totals"]["records_done"] == 13


def test_resume_after_a_crash_between_store_and_checkpoint_stores_nothing_twice(db, seed_job, seed_shard) -> None:
    seed_job(db, "job", synthetic_spec())
    key = seed_shard(db, "job", 0, 0, 25)
    # The second batch (10..19) was stored but its checkpoint was never written.
    write_records(db["out"], [{"_id": k, "seq": i} for i, k in enumerate(keys(0, 20))], mode="insert", run=RunStamp("job"))
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
    assert checkpoint(db, key)["batches"] == 0


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


# --- pipelines of the SDK: opaque cursors, `done`, identity, work items ---------------------------


class TokenParams(BaseModel):
    pages: int
    per_page: int


class UrlParams(BaseModel):
    urls: list[str]


class TokenPages(Pipeline[TokenParams]):
    """A source paged by an opaque token (a dict), as an HTTP API's next-page cursor: the runner
    must store the token as it is and end the shard when the pipeline says `done`, not at a key."""

    name = "token_pages"
    Params = TokenParams
    space = Single()

    def start(self, bounds: Bounds) -> Any:
        return {"page": "p0"}

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        page = int(cursor["page"][1:])
        records = [{"code": f"c{page}-{i}", "n": i} for i in range(self.params.per_page)]
        last = page + 1 >= self.params.pages
        return Batch(records, None if last else {"page": f"p{page + 1}"}, done=last)

    def identity(self, record: dict[str, Any]) -> str:
        return f"token:{record['code']}"


class Urls(Pipeline[UrlParams]):
    name = "url_list"
    Params = UrlParams
    space = WorkItems("urls")

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        assert bounds.items is not None
        chunk = list(bounds.items[int(cursor) - bounds.start :][:limit])
        after = int(cursor) + len(chunk)
        return Batch([{"_id": url} for url in chunk], after, done=after >= bounds.end, position=after)


@pytest.fixture
def sdk_pipelines(monkeypatch):
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(TokenPages.name, TokenPages)
    pipelines.register_pipeline(Urls.name, Urls)


def test_an_opaque_cursor_is_checkpointed_as_is_and_the_shard_ends_when_the_pipeline_says_done(db, seed_job, seed_shard, sdk_pipelines) -> None:
    seed_job(db, "tok", {"pipeline": "token_pages", "params": {"pages": 4, "per_page": 3}, "target_collection": "out"})
    key = seed_shard(db, "tok", 0, 0, 1)

    outcome = run_shard(runner(db), RunShard(job_id="tok", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded" and outcome.records == 12
    cp = checkpoint(db, key)
    assert (cp["cursor"], cp["done"], cp["position"], cp["batches"]) == (None, True, 1, 4)
    assert sorted(d["_id"] for d in db["out"].find({}, {"_id": 1}))[:2] == ["token:c0-0", "token:c0-1"]  # identity is the _id


def test_a_run_resumes_at_the_committed_opaque_cursor(db, seed_job, seed_shard, sdk_pipelines) -> None:
    seed_job(db, "tok", {"pipeline": "token_pages", "params": {"pages": 4, "per_page": 3}, "target_collection": "out"})
    key = seed_shard(db, "tok", 0, 0, 1)
    # A worker stored pages 0 and 1, committed the token of page 2, then died.
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cursor": {"page": "p2"}, "batches": 2, "records_done": 6}})

    outcome = run_shard(runner(db), RunShard(job_id="tok", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded" and outcome.records == 6  # pages 2 and 3 only
    assert sorted(d["_id"] for d in db["out"].find({}, {"_id": 1})) == [f"token:c{p}-{i}" for p in (2, 3) for i in range(3)]


def test_a_shard_committed_done_by_a_run_that_died_succeeds_without_reading_again(db, seed_job, seed_shard, sdk_pipelines) -> None:
    seed_job(db, "tok", {"pipeline": "token_pages", "params": {"pages": 4, "per_page": 3}, "target_collection": "out"})
    key = seed_shard(db, "tok", 0, 0, 1)
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cursor": None, "done": True, "batches": 4, "records_done": 12}})

    outcome = run_shard(runner(db), RunShard(job_id="tok", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded" and outcome.records == 0
    assert db["out"].count_documents({}) == 0  # a token of None would have restarted at page 0


def test_a_work_items_shard_reads_its_slice_of_the_list_param(db, seed_job, seed_shard, sdk_pipelines) -> None:
    urls = [f"https://example.test/{i}" for i in range(10)]
    job = seed_job(db, "urls", {"pipeline": "url_list", "params": {"urls": urls}, "target_collection": "out", "batch_size": 2})
    db[JOBS].update_one({"_id": job["_id"]}, {"$set": {"space": {"kind": "work_items", "field": "urls", "start": 0, "end": 10}}})
    key = seed_shard(db, "urls", 1, 4, 7)

    outcome = run_shard(runner(db), RunShard(job_id="urls", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert outcome.kind == "succeeded"
    assert sorted(d["_id"] for d in db["out"].find({}, {"_id": 1})) == urls[4:7]
    assert checkpoint(db, key)["position"] == 7


class Closing(TokenPages):
    name = "closing_pages"
    closed: list[str] = []

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        if self.params.pages == 0:
            raise NonRetryableError("no pages at all")
        return super().read(bounds, cursor, limit)

    def close(self) -> None:
        Closing.closed.append(self.context.shard_key)


def test_the_pipeline_is_closed_when_its_run_ends_whatever_the_outcome(db, seed_job, seed_shard, monkeypatch) -> None:
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(Closing.name, Closing)
    monkeypatch.setattr(Closing, "closed", [])
    seed_job(db, "ok", {"pipeline": "closing_pages", "params": {"pages": 2, "per_page": 1}, "target_collection": "out"})
    seed_job(db, "bad", {"pipeline": "closing_pages", "params": {"pages": 0, "per_page": 1}, "target_collection": "out"})
    ok, bad = seed_shard(db, "ok", 0, 0, 1), seed_shard(db, "bad", 0, 0, 1)

    assert run_shard(runner(db), RunShard(job_id="ok", shard_key=ok), max_attempts=MAX_ATTEMPTS).kind == "succeeded"
    with pytest.raises(ShardFailed):
        run_shard(runner(db), RunShard(job_id="bad", shard_key=bad), max_attempts=MAX_ATTEMPTS)

    assert Closing.closed == [ok, bad]


class BadCursor(TokenPages):
    """Returns, as its first batch's cursor, what `per_page` picks: none of them a JSON value."""

    name = "bad_cursor"
    CURSORS: ClassVar[dict[int, Any]] = {
        0: {1, 2},  # a set: BSON refuses it at the commit, after the records were stored
        1: datetime(2026, 1, 1, tzinfo=UTC),  # stored as a BSON date, read back naive: not the cursor returned
        2: float("nan"),
        3: (1, 2),  # read back as a list
        4: 2**64,
        5: {"k": "x" * 70_000},
    }

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        return Batch([{"code": "c", "n": 0}], self.CURSORS[self.params.per_page], done=True)


@pytest.mark.parametrize("which", sorted(BadCursor.CURSORS))
def test_a_cursor_that_is_not_json_fails_the_shard_for_good_before_its_batch_is_stored(db, seed_job, seed_shard, monkeypatch, which) -> None:
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(BadCursor.name, BadCursor)
    seed_job(db, "bad", {"pipeline": "bad_cursor", "params": {"pages": 2, "per_page": which}, "target_collection": "out"})
    key = seed_shard(db, "bad", 0, 0, 1)

    with pytest.raises(ShardFailed) as failed:
        run_shard(runner(db), RunShard(job_id="bad", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert isinstance(failed.value.error, NonRetryableError) and "cursor" in str(failed.value.error)
    assert db["out"].count_documents({}) == 0 and checkpoint(db, key)["batches"] == 0


class StuckCursor(TokenPages):
    """Its second batch hands back the cursor it was given, and says it is not done."""

    name = "stuck_cursor"

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        if cursor == {"page": "p0"}:
            return Batch([{"code": "a", "n": 1}], {"page": "p1"})
        return Batch([{"code": "b", "n": 2}], {"page": "p1"})


def test_a_pipeline_that_does_not_advance_its_cursor_fails_for_good_before_storing_the_batch(db, seed_job, seed_shard, monkeypatch) -> None:
    """Without the guard the run would read the same page until its slice ended, then hand off
    to a continuation that did the same, forever."""
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(StuckCursor.name, StuckCursor)
    seed_job(db, "stuck", {"pipeline": "stuck_cursor", "params": {"pages": 2, "per_page": 1}, "target_collection": "out"})
    key = seed_shard(db, "stuck", 0, 0, 1)

    with pytest.raises(ShardFailed) as failed:
        run_shard(runner(db), RunShard(job_id="stuck", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert isinstance(failed.value.error, CursorNotAdvanced) and not is_retryable(failed.value.error)
    assert "stuck_cursor" in str(failed.value.error)
    assert db["out"].count_documents({}) == 1 and checkpoint(db, key)["batches"] == 1  # the first batch only


class OscillatingCursor(TokenPages):
    """Pages p0 -> p1 -> p0 -> ... (an API whose next tokens or Links point back at each other),
    never done; gives up by itself after a few reads so that, unguarded, the test fails, not hangs."""

    name = "oscillating_cursor"
    reads = 0

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        type(self).reads += 1
        if type(self).reads > 10:
            raise NonRetryableError("looped: the runner read on")
        if cursor == {"page": "p0"}:
            return Batch([{"code": "a", "n": 1}], {"page": "p1"})
        return Batch([{"code": "b", "n": 2}], {"page": "p0"})


def test_a_pipeline_that_comes_back_to_an_earlier_cursor_fails_for_good(db, seed_job, seed_shard, monkeypatch) -> None:
    """A cursor seen before in the run means the reads go round in a loop: the same guard as a
    cursor that does not move, at the batch that closes the loop."""
    monkeypatch.setattr(pipelines, "_registered", dict(pipelines._registered))
    pipelines.register_pipeline(OscillatingCursor.name, OscillatingCursor)
    seed_job(db, "loop", {"pipeline": "oscillating_cursor", "params": {"pages": 2, "per_page": 1}, "target_collection": "out"})
    key = seed_shard(db, "loop", 0, 0, 1)

    with pytest.raises(ShardFailed) as failed:
        run_shard(runner(db), RunShard(job_id="loop", shard_key=key), max_attempts=MAX_ATTEMPTS)

    assert isinstance(failed.value.error, CursorNotAdvanced), failed.value.error
    assert checkpoint(db, key)["batches"] == 1  # p0 -> p1 committed; p1 -> p0 refused before it is stored
