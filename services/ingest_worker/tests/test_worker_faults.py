"""Issue 11 items 2(b) and 4 in the worker, over real collections: MongoDB going away mid-run or
at claim time, a batch that hangs, and a cancel arriving while a batch hangs.

The outage tests run a MongoDB stand-in of their own (stopped and restarted for real), so the
session's server is never disturbed.
"""

import signal
import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.exceptions import Retry, SoftTimeLimitExceeded
from pymongo import MongoClient
from pymongo.database import Database

from cairn_contracts.clock import now_ms
from cairn_contracts.messages import RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.errors import BatchTimedOut, StoreUnavailable, is_retryable
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_ingest_worker.runner import ShardFailed, ShardRunner, run_shard
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.tasks import _hand_off_when_store_answers, register_tasks
from cairn_runtime.celery_config import celery_config
from cairn_testkit.servers import MongoStandIn

MAX_ATTEMPTS = 3


def make_runner(
    db: Database, *, ttl_s: float = 30, heartbeat_s: float = 5, batch_time_limit_s: float | None = None
) -> ShardRunner:
    return ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=ttl_s),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,
        source_db=db,
        heartbeat_interval_s=heartbeat_s,
        slice_s=600,
        batch_time_limit_s=batch_time_limit_s,
    )


def spec(count: int, batch_size: int = 10, **params: object) -> dict:
    return {"pipeline": "synthetic", "params": {"count": count, **params}, "batch_size": batch_size, "target_collection": "out"}


@pytest.fixture
def own_db(private_mongo: MongoStandIn) -> Iterator[Database]:
    # A short server selection so each call made during the outage fails within a second.
    client = MongoClient(private_mongo.uri, serverSelectionTimeoutMS=1000, tz_aware=True)
    yield client["cairn_faults"]
    client.close()


def wait_until(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- item 4: MongoDB unreachable --------------------------------------------------------------------


def test_a_store_outage_mid_run_hands_the_shard_back_and_it_resumes_at_once_without_losing_an_attempt(
    private_mongo: MongoStandIn, own_db: Database, seed_job, seed_shard
) -> None:
    db = own_db
    seed_job(db, "job", spec(400, delay_ms_per_record=2))  # 20 ms a batch
    key = seed_shard(db, "job", 0, 0, 400)
    runner = make_runner(db, ttl_s=30)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            run_shard(runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: db[CHECKPOINTS].find_one({"shard_key": key})["batches"] >= 3, "three batches")
    private_mongo.stop()
    thread.join(60)
    assert not thread.is_alive()
    error = outcome.get("error")
    # Before: a ServerSelectionTimeoutError (or a ShardFailed around it), which the task turned
    # into a dropped delivery and a failed attempt.
    assert isinstance(error, StoreUnavailable), repr(error)
    assert error.claim is not None and error.claim.shard_key == key

    private_mongo.start()  # same data directory and port: the store is back
    settings = WorkerSettings(lease_ttl_s=30, store_retry_base_s=0.1, store_retry_max_s=0.5)
    ctx = WorkerContext(settings=settings, runner=runner, publisher=None)  # type: ignore[arg-type]
    assert _hand_off_when_store_answers(ctx, error.claim) is True
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["lease_until"] == 0 and shard["attempts"] == 0  # the attempt was given back

    # The retried task claims it at once (no waiting for the lease to expire) and finishes exactly.
    resumed = run_shard(runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)
    assert resumed.kind == "succeeded" and not resumed.claim.reclaimed
    assert db["out"].count_documents({}) == 400
    cp = db[CHECKPOINTS].find_one({"shard_key": key})
    assert cp["cursor"] == 400 and cp["records_done"] == 400
    assert db[SHARDS].find_one({"_id": key})["attempts"] == 1


def test_a_task_whose_claim_meets_an_unreachable_store_is_retried_not_dropped(
    private_mongo: MongoStandIn, own_db: Database, seed_job, seed_shard, amqp_url: str
) -> None:
    db = own_db
    seed_job(db, "job", spec(20))
    key = seed_shard(db, "job", 0, 0, 20)
    settings = WorkerSettings(store_retry_base_s=0.1, store_retry_max_s=0.5)
    app = Celery("faults-test")
    app.conf.update(celery_config(amqp_url))
    ctx = WorkerContext(settings=settings, runner=make_runner(db), publisher=BrokerPublisher(app))
    register_tasks(app, lambda: ctx)
    private_mongo.stop()

    # Before: the store error escaped the task, which Celery acked: the shard then waited for the
    # scheduler's redispatch of stale shards (CAIRN_REDISPATCH_AFTER_S, 300 s).
    with pytest.raises(Retry):
        app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key)

    private_mongo.start()
    assert app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key) == "succeeded"
    assert db["out"].count_documents({}) == 20


def test_a_frontier_runner_meeting_an_unreachable_store_is_retried_not_dropped(
    private_mongo: MongoStandIn, own_db: Database, amqp_url: str
) -> None:
    settings = WorkerSettings(store_retry_base_s=0.1, store_retry_max_s=0.5)
    app = Celery("faults-frontier-test")
    app.conf.update(celery_config(amqp_url))
    ctx = WorkerContext(settings=settings, runner=make_runner(own_db), publisher=BrokerPublisher(app))
    register_tasks(app, lambda: ctx)
    private_mongo.stop()

    with pytest.raises(Retry):  # before: the store error ended the lane's task, acked
        app.tasks[TASK_RUN_FRONTIER](job_id="job", lane=0)


# --- item 2(b): a batch bounded in time --------------------------------------------------------------


def test_a_hung_batch_stops_its_lease_renewals_and_is_not_committed(db: Database, seed_job, seed_shard) -> None:
    seed_job(db, "job", spec(40, delay_ms_per_record=150))  # 1.5 s a batch
    key = seed_shard(db, "job", 0, 0, 40)
    runner = make_runner(db, ttl_s=0.6, heartbeat_s=0.1, batch_time_limit_s=0.4)

    outcome = run_shard(runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)

    # Before: the heartbeat renewed the lease for as long as the read hung, and the batch landed.
    assert outcome.kind == "lease_lost"
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == ShardState.RUNNING and shard["lease_until"] < now_ms()  # left to expire: the reaper takes it
    cp = db[CHECKPOINTS].find_one({"shard_key": key})
    assert cp["cursor"] is None and cp["batches"] == 0 and db["out"].count_documents({}) == 0


def test_a_cancel_during_a_hung_batch_stops_the_renewals_and_the_shard_without_storing_the_batch(
    db: Database, seed_job, seed_shard
) -> None:
    seed_job(db, "job", spec(40, delay_ms_per_record=200))  # 2 s a batch
    key = seed_shard(db, "job", 0, 0, 40)
    runner = make_runner(db, ttl_s=30, heartbeat_s=0.1, batch_time_limit_s=60)
    result = {}
    request = RunShard(job_id="job", shard_key=key)
    thread = threading.Thread(target=lambda: result.update(o=run_shard(runner, request, max_attempts=MAX_ATTEMPTS)))
    thread.start()
    wait_until(lambda: db[SHARDS].find_one({"_id": key})["state"] == ShardState.RUNNING, "the claim")
    # What the scheduler's cancel does: mark the shard and its checkpoint.
    db[SHARDS].update_one({"_id": key}, {"$set": {"cancel_requested": True}})
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"cancel_requested": True}})
    marked = db[SHARDS].find_one({"_id": key})["lease_until"]
    time.sleep(0.6)
    assert db[SHARDS].find_one({"_id": key})["lease_until"] == marked  # no renewal after the cancel
    thread.join(30)

    # Before: the hung batch was stored and committed, then the shard stopped.
    assert result["o"].kind == "cancelled" and result["o"].records == 0
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.CANCELLED
    assert db["out"].count_documents({}) == 0 and db[CHECKPOINTS].find_one({"shard_key": key})["batches"] == 0


def test_the_soft_time_limit_ends_a_hung_batch_as_a_retryable_timeout_with_nothing_committed(
    db: Database, seed_job, seed_shard
) -> None:
    seed_job(db, "job", spec(40, delay_ms_per_record=1000))  # 10 s a batch
    key = seed_shard(db, "job", 0, 0, 40)
    runner = make_runner(db)

    def soft_limit(*_: object) -> None:  # what billiard's handler does in a pool process
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_limit)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(ShardFailed) as failed:
            run_shard(runner, RunShard(job_id="job", shard_key=key), max_attempts=MAX_ATTEMPTS)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert isinstance(failed.value.error, BatchTimedOut) and isinstance(failed.value.error, TimeoutError)
    assert is_retryable(failed.value.error)  # the retry policy applies, then the dead-letter queue
    cp = db[CHECKPOINTS].find_one({"shard_key": key})
    assert cp["batches"] == 0 and db["out"].count_documents({}) == 0


def test_every_delivery_has_a_soft_and_a_hard_time_limit_from_the_settings() -> None:
    from cairn_ingest_worker.bootstrap import create_app

    settings = WorkerSettings(task_slice_s=60, batch_time_limit_s=20, hard_time_limit_grace_s=10)
    app = create_app(settings)
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (80, 90)
    assert app.conf.broker_heartbeat and app.conf.broker_transport_options["confirm_publish"]
