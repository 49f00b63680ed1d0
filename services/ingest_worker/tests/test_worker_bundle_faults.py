"""Bundles of small shards under faults (issue 14; found by a break-it review): a crash of the
bundle does not charge the shards still waiting their turn, a shard run alone inside a bundle
keeps to the bundle's slice, a bundle names only its job's shards, and a cancel stops the shards
not started. Driven as test_worker_bundles.py drives tasks (the real MongoDB-wire stand-in and a
RabbitMQ vhost of the test's own)."""

import time
from typing import Any

from celery import Celery
from pymongo.database import Database

from cairn_contracts.clock import now_ms
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_contracts.tasks import TASK_RUN_SHARDS
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_ingest_worker.runner import ShardRunner
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.tasks import register_tasks
from cairn_runtime.celery_config import celery_config


# --- as in test_worker_bundles.py (importlib import mode: no import between test modules) ------
def spec(count: int, batch_size: int = 100, **params: object) -> dict:
    return {"pipeline": "synthetic", "params": {"count": count, **params}, "batch_size": batch_size, "target_collection": "out"}


def bundle_job(db: Database, seed_job: Any, seed_shard: Any, shards: int, per_shard: int = 10, **params: object) -> list[str]:
    seed_job(db, "job", spec(shards * per_shard, **params))
    return [seed_shard(db, "job", i, i * per_shard, (i + 1) * per_shard) for i in range(shards)]


def worker(db: Database, amqp_url: str, *, slice_s: float = 600, ttl_s: float = 30) -> tuple[Celery, WorkerContext]:
    app = Celery("bundles-review")
    app.conf.update(celery_config(amqp_url))
    runner = ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=ttl_s), jobs=db[JOBS], shards=db[SHARDS],
        records_db=db, source_db=db, heartbeat_interval_s=5, slice_s=slice_s,
    )
    ctx = WorkerContext(settings=WorkerSettings(max_attempts=3, retry_base_delay_s=0), runner=runner, publisher=BrokerPublisher(app))
    register_tasks(app, lambda: ctx)
    return app, ctx


def _reap(db: Database, keys: list[str]) -> None:
    """What LeaseReaper.reap writes once a lease expired (scheduler/reaper.py): back to QUEUED."""
    db[SHARDS].update_many(
        {"_id": {"$in": keys}, "state": ShardState.RUNNING},
        {"$set": {"state": ShardState.QUEUED, "taken_by": None, "queued_at_ms": now_ms()}, "$inc": {"reclaims": 1}},
    )


def test_shards_of_a_bundle_that_never_started_are_not_dead_lettered_as_poison(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    """A bundle whose pool process dies (OOM, SIGKILL, hard time limit) while it runs its first
    shard, redelivered after the reaper put its shards back (a backlog longer than the lease TTL),
    again and again: a bulk claim counts no attempt (a shard's run counts it when it starts), so
    the shards that never started are not dead-lettered as poison."""
    keys = bundle_job(db, seed_job, seed_shard, 4)
    app, ctx = worker(db, amqp_url)  # max_attempts=3
    for _ in range(3):
        claims = ctx.runner.leases.claim_waiting(keys)  # the delivery's bulk claim
        assert sorted(claims) == keys
        # ... the process dies while shard 0 runs: nothing handed back, the leases expire.
        db[SHARDS].update_many({"_id": {"$in": keys}}, {"$set": {"lease_until": now_ms() - 1}})
        _reap(db, keys)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)

    states = {key: db[SHARDS].find_one({"_id": key})["state"] for key in keys}
    # Shard 0 may well be poison; shards 1..3 never ran and must not be.
    assert [states[key] for key in keys[1:]] == [ShardState.SUCCEEDED] * 3, (result, states)


def test_a_shard_run_one_by_one_in_a_bundle_keeps_to_the_bundles_slice(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    """The rest of a bundle re-sent after a slice-over names shards handed back (RUNNING, lease
    0), which the bulk claim does not take: each is run as its own task would be, but within the
    bundle's deadline, not a fresh slice (a task must stay under Celery's time limits)."""
    seed_job(db, "job", spec(27, batch_size=1, delay_ms_per_record=50))  # one batch: 50 ms
    keys = [seed_shard(db, "job", 0, 0, 7), seed_shard(db, "job", 1, 7, 27)]  # 0.35 s, then 1.0 s
    # Handed back by the previous delivery of the bundle (its slice ended): RUNNING, lease 0.
    db[SHARDS].update_many({"_id": {"$in": keys}}, {"$set": {"state": ShardState.RUNNING, "lease_until": 0, "taken_by": "worker-a"}})
    slice_s = 0.5
    app, _ = worker(db, amqp_url, slice_s=slice_s)

    task = app.tasks[TASK_RUN_SHARDS]
    task.push_request(id="bundle-2", kwargs={"job_id": "job", "shard_keys": keys}, called_directly=False, retries=0,
                      delivery_info={"routing_key": "cairn.ingest", "priority": 2})
    started = time.monotonic()
    try:
        try:
            task.run(job_id="job", shard_keys=keys)
        except Exception:
            pass  # a Retry (slice over) is the expected end
    finally:
        task.pop_request()
    elapsed = time.monotonic() - started

    # Shard 0 takes ~0.35 s; shard 1 starts at ~0.35 s (< 0.5 s) and should be handed off at the
    # bundle's deadline, one batch later at most; it runs to 0.35 + 0.5 s instead.
    assert elapsed < slice_s + 0.2, f"the bundle ran {elapsed:.2f} s with a {slice_s} s slice"


def test_a_bundle_naming_a_shard_of_another_job_is_refused(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    """A bundle names `<job id>:<index>` keys of its own job only: a key of job "job:x" in a
    bundle of job "job" is refused by the contract (dead-lettered), never run with the wrong job."""
    seed_job(db, "job", spec(10))
    seed_job(db, "job:x", {**spec(10, key_prefix="fx"), "target_collection": "other"})
    mine = seed_shard(db, "job", 0, 0, 10)
    foreign = seed_shard(db, "job:x", 0, 0, 10)  # "job:x:0000"
    app, _ = worker(db, amqp_url)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=[mine, foreign])

    assert result == "contract_violation"  # dead-lettered whole: neither shard was touched
    assert [db[SHARDS].find_one({"_id": key})["state"] for key in (mine, foreign)] == [ShardState.QUEUED, ShardState.QUEUED]


def _stop_shards(db: Database, job_id: str) -> None:
    """scheduler/stopping.py stop_shards, synchronously (the cancel's writes)."""
    unmarked = {"job_id": job_id, "cancel_requested": {"$in": [False, None]}}
    db[CHECKPOINTS].update_many(unmarked, {"$set": {"cancel_requested": True}})
    db[SHARDS].update_many(unmarked, {"$set": {"cancel_requested": True}})
    db[SHARDS].update_many(
        {"job_id": job_id, "state": {"$in": [ShardState.PLANNED, ShardState.QUEUED, ShardState.RETRY]}},
        {"$set": {"state": ShardState.CANCELLED, "lease_until": None, "taken_by": None}},
    )


def test_shards_of_a_bundle_not_started_when_their_job_is_cancelled_do_not_run(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    """A job cancelled while a bundle of its small shards runs: sent one task each, the shards
    not started would end CANCELLED, never run; so do a bundle's (its merged write looks for the
    cancel, a start refuses it), at most the shard running at that moment ends as it would."""
    import threading

    keys = bundle_job(db, seed_job, seed_shard, 6, delay_ms_per_record=10)  # 100 ms a shard
    app, _ = worker(db, amqp_url)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)))
    thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and db[SHARDS].count_documents({"job_id": "job", "state": ShardState.RUNNING}) < 6:
        time.sleep(0.005)
    _stop_shards(db, "job")  # the bundle is reading shard 0 now
    thread.join()

    states = [db[SHARDS].find_one({"_id": key})["state"] for key in keys]
    assert states.count(ShardState.SUCCEEDED) <= 1, (results, states, db["out"].count_documents({}))


# --- what the review checked and found right --------------------------------------------------


def test_a_bundle_with_an_unknown_shard_key_runs_the_others_and_dead_letters_that_one(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 2)
    app, _ = worker(db, amqp_url)
    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=[keys[0], "job:9999", keys[1]])
    assert result == "2 succeeded, 1 unknown_shard"


def test_a_bundle_of_a_cancelled_job_runs_nothing(db: Database, seed_job: Any, seed_shard: Any, amqp_url: str) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3)
    _stop_shards(db, "job")
    app, _ = worker(db, amqp_url)
    assert app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys) == "3 cancelled"
    assert db["out"].count_documents({}) == 0


def test_a_bundle_redelivered_while_its_first_delivery_holds_the_shards_takes_nothing(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3)
    app, ctx = worker(db, amqp_url)
    ctx.runner.leases.claim_waiting(keys)  # the first delivery (its process alive, leases live)
    assert app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys) == "3 held_elsewhere"
    assert db["out"].count_documents({}) == 0


def test_one_crash_of_a_neighbour_does_not_dead_letter_a_max_attempts_1_jobs_unstarted_shards(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    """A job allowed one attempt (`retry.max_attempts: 1`): one crash while the bundle runs shard 0
    charges only shard 0; the others, sent again by the reaper one task each, run."""
    seed_job(db, "job", {**spec(40), "retry": {"max_attempts": 1}})
    keys = [seed_shard(db, "job", i, i * 10, (i + 1) * 10) for i in range(4)]
    app, ctx = worker(db, amqp_url)
    ctx.runner.leases.claim_waiting(keys)  # the bundle's delivery; its process then dies in shard 0
    db[SHARDS].update_many({"_id": {"$in": keys}}, {"$set": {"lease_until": now_ms() - 1}})
    _reap(db, keys)

    from cairn_contracts.tasks import TASK_RUN_SHARD

    results = {key: app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key) for key in keys[1:]}  # the reaper's RunShards
    assert set(results.values()) == {"succeeded"}, results
