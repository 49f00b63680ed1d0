"""Bundles of small shards (issue 14; scheduler/bundles.py): one task claims its waiting shards
in bulk and runs them one after another, each ending as it would alone; and the same under faults
(a crash of the bundle, a slice's end, a cancel, a key of another job). Against the MongoDB-wire
server and a RabbitMQ vhost of the test's own (events and re-sent tasks are real messages)."""

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry
from kombu import Connection
from pymongo import MongoClient, monitoring
from pymongo.database import Database

from cairn_contracts.clock import now_ms
from cairn_contracts.messages import DeadLetter, RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD, TASK_RUN_SHARDS
from cairn_contracts.topology import QUEUE_DLQ, QUEUE_INGEST, QUEUE_SCHEDULER_EVENTS
from cairn_ingest_worker.context import WorkerContext
from cairn_ingest_worker.leases import HeldLeases, OneBatch, ShardLeases
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_ingest_worker.runner import ShardRunner, run_in_one_batch
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.store import WriteCounts
from cairn_ingest_worker.tasks import register_tasks
from cairn_runtime.celery_config import celery_config


def spec(count: int, batch_size: int = 100, **params: object) -> dict:
    return {"pipeline": "synthetic", "params": {"count": count, **params}, "batch_size": batch_size, "target_collection": "out"}


def bundle_job(db: Database, seed_job: Any, seed_shard: Any, shards: int, per_shard: int = 10, **params: object) -> list[str]:
    seed_job(db, "job", spec(shards * per_shard, **params))
    return [seed_shard(db, "job", i, i * per_shard, (i + 1) * per_shard) for i in range(shards)]


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(f"{event.command_name} {event.command.get(event.command_name)}")

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def observed(db: Database, test_env: Any) -> Iterator[tuple[Database, Commands]]:
    commands = Commands()
    client: MongoClient = MongoClient(test_env.mongodb_uri, event_listeners=[commands], tz_aware=True)
    yield client[db.name], commands
    client.close()


def worker(db: Database, amqp_url: str, *, slice_s: float = 600, ttl_s: float = 30) -> tuple[Celery, WorkerContext]:
    app = Celery("bundles-test")
    app.conf.update(celery_config(amqp_url))
    runner = ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=ttl_s, jobs=db[JOBS]), jobs=db[JOBS], shards=db[SHARDS],
        records_db=db, source_db=db, heartbeat_interval_s=5, slice_s=slice_s,
    )
    ctx = WorkerContext(settings=WorkerSettings(max_attempts=3, retry_base_delay_s=0), runner=runner, publisher=BrokerPublisher(app))
    register_tasks(app, lambda: ctx)
    return app, ctx


def take(amqp_url: str, queue: str) -> list[Any]:
    """The messages waiting on `queue`, taken off it (basic.get: nothing is declared)."""
    found = []
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            found.append(message)
    return found


def dead_letters(amqp_url: str) -> list[DeadLetter]:
    """The dead letters published so far."""
    return [DeadLetter.model_validate_json(message.body) for message in take(amqp_url, QUEUE_DLQ)]


def events(amqp_url: str) -> list[dict[str, Any]]:
    """The ShardFinished events published so far."""
    return [json.loads(message.body) for message in take(amqp_url, QUEUE_SCHEDULER_EVENTS)]


def test_a_bundle_claims_its_waiting_shards_in_two_round_trips_and_first_claims_adopt_their_checkpoints_later(
    observed: tuple[Database, Commands], seed_job: Any, seed_shard: Any
) -> None:
    db, commands = observed
    keys = bundle_job(db, seed_job, seed_shard, 6)
    db[SHARDS].update_one({"_id": keys[4]}, {"$set": {"state": ShardState.SUCCEEDED}})  # finished: not taken
    db[SHARDS].update_one({"_id": keys[5]}, {"$set": {"cancel_requested": True}})  # its job cancelled: not taken
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30)

    commands.names.clear()
    claims = leases.claim_waiting(keys)

    assert sorted(claims) == keys[:4]
    assert commands.names == ["update shards", "find shards"]
    for key, claim in claims.items():
        shard = db[SHARDS].find_one({"_id": key})
        # Taken, not started: its attempt is counted when its run begins (a crash of the bundle
        # does not charge the shards waiting their turn).
        assert shard["state"] == ShardState.RUNNING and shard["taken_by"] == "worker-a" and shard["attempts"] == 0
        assert claim.token == shard["fencing_token"] == 1 and claim.attempt == 0 and claim.fresh and shard["bundle_claim"]
        assert shard["queued_task"] == keys[0]  # one task for fair dispatch, also if claimed before the scheduler marked it
        # Never held before, so its checkpoint is as planned: adopted by the claim's first write to it.
        assert not claim.adopted and claim.cursor is None and not claim.done
        assert db[CHECKPOINTS].find_one({"_id": claim.checkpoint_id})["fencing_token"] == 0
    assert leases.claim_waiting(keys) == {}  # nothing waits any more: a duplicate delivery takes nothing


def test_a_bundle_claim_of_shards_held_before_adopts_their_checkpoints_and_leaves_out_a_newer_holders(
    observed: tuple[Database, Commands], seed_job: Any, seed_shard: Any
) -> None:
    db, commands = observed
    keys = bundle_job(db, seed_job, seed_shard, 3)
    # Each was held before (handed back, re-queued): its checkpoint may carry an older run's work.
    db[SHARDS].update_many({"_id": {"$in": keys}}, {"$set": {"fencing_token": 2}})
    db[CHECKPOINTS].update_one({"shard_key": keys[0]}, {"$set": {"fencing_token": 2, "cursor": 5, "batches": 1}})
    db[CHECKPOINTS].update_one({"shard_key": keys[2]}, {"$set": {"fencing_token": 7}})  # a newer holder's
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30)

    commands.names.clear()
    claims = leases.claim_waiting(keys)

    assert commands.names == ["update shards", "find shards", "update checkpoints", "find checkpoints"]
    assert sorted(claims) == keys[:2]  # the third is left to its lease's expiry and the reaper
    assert all(claim.adopted and claim.token == 3 for claim in claims.values())
    assert claims[keys[0]].cursor == 5 and not claims[keys[0]].fresh and claims[keys[1]].fresh
    for key in keys[:2]:
        assert db[CHECKPOINTS].find_one({"shard_key": key})["fencing_token"] == 3  # older tokens' commits refused


def test_a_first_claims_commit_is_refused_once_a_newer_holder_adopted_the_checkpoint_and_lands_before(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 2)
    runner = runner_over(db)
    claims = runner.leases.claim_waiting(keys)
    started = runner.leases.start_all([claims[key] for key in keys])
    # Shard 0: worker-b takes it over now (the lease expired) and adopts its checkpoint.
    db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"lease_until": 1}})
    other = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-b", ttl_s=30)
    newer = other.claim(keys[0])
    assert newer is not None and newer.token == 2 and newer.adopted

    finished, cancelled = runner.leases.finish_all([OneBatch(claim, 10, None, 10, WriteCounts(inserted=10)) for claim in started])

    assert finished == {keys[1]} and not cancelled
    assert db[CHECKPOINTS].find_one({"shard_key": keys[0]})["batches"] == 0  # its holder commits it, not this bundle
    assert db[CHECKPOINTS].find_one({"shard_key": keys[1]})["fencing_token"] == 1  # adopted by its commit
    # Shard 1, the other order: the first claim committed before a newer holder came, which then
    # finds the shard done by that commit (and ends it without reading it again).
    db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"state": ShardState.RUNNING, "lease_until": 1}})
    resumed = other.claim(keys[1])
    assert resumed is not None and resumed.done and resumed.batches == 1 and resumed.token == 2


def test_a_late_claim_never_writes_the_documents_of_the_job_submitted_again_under_the_same_id(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    # Submitted, claimed by a bundle (token 1, its checkpoint not adopted yet), then the worker stalls.
    seed_job(db, "job", spec(10))
    key = seed_shard(db, "job", 0, 0, 10, job_created_at_ms=1_000)
    runner = runner_over(db)
    (stale,) = runner.leases.start_all(list(runner.leases.claim_waiting([key]).values()))
    # Meanwhile the job was deleted and submitted again with the same Idempotency-Key (same id,
    # same shard keys), and its shard claimed by another worker: token 1 again, checkpoint at 0.
    db[SHARDS].delete_many({"job_id": "job"})
    db[CHECKPOINTS].delete_many({"job_id": "job"})
    seed_shard(db, "job", 0, 0, 10, job_created_at_ms=2_000)
    other = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-b", ttl_s=30)
    (newer,) = other.start_all(list(other.claim_waiting([key]).values()))
    assert newer.token == stale.token == 1

    # The stalled worker wakes up: neither its commit nor its shard writes touch the new job's.
    assert runner.leases.finish_all([OneBatch(stale, 10, None, 10, WriteCounts(inserted=10))]) == (set(), set())
    assert not runner.leases.succeed(stale, {"records_done": 10}) and not runner.leases.renew(stale)
    assert runner.leases.adopt_all([stale]) == ([], [stale])
    checkpoint = db[CHECKPOINTS].find_one({"_id": stale.checkpoint_id})
    assert checkpoint["batches"] == 0 and checkpoint["fencing_token"] == 0 and checkpoint["job_created_at_ms"] == 2_000
    assert db[SHARDS].find_one({"_id": key})["taken_by"] == "worker-b"
    # The new job's own claim commits as usual.
    assert other.finish_all([OneBatch(newer, 10, None, 10, WriteCounts(inserted=10))]) == ({key}, set())


def test_a_late_single_claims_commit_never_lands_in_the_job_submitted_again_with_the_same_token(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    seed_job(db, "job", spec(10))
    key = seed_shard(db, "job", 0, 0, 10, job_created_at_ms=1_000)
    stale = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30).claim(key)
    assert stale is not None and stale.token == 1 and stale.adopted
    db[SHARDS].delete_many({"job_id": "job"})
    db[CHECKPOINTS].delete_many({"job_id": "job"})
    seed_shard(db, "job", 0, 0, 10, job_created_at_ms=2_000)
    newer = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-b", ttl_s=30).claim(key)
    assert newer is not None and newer.token == 1  # the same token, on the new documents

    late = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30)
    assert not late.commit(stale, 10, 10, WriteCounts(inserted=10), done=True).stored
    assert not late.succeed(stale, {"records_done": 10})
    # Nor does a read-back take the new documents (same token) for the late claim's own.
    assert late.start_all([stale]) == []
    assert late.adopt_all([replace(stale, adopted=False)]) == ([], [replace(stale, adopted=False)])
    assert db[CHECKPOINTS].find_one({"_id": stale.checkpoint_id})["batches"] == 0
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.RUNNING


def test_a_worker_runs_a_job_submitted_again_under_the_same_id_with_its_new_spec_not_the_cached_one(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    first = seed_job(db, "job", spec(10))
    key = seed_shard(db, "job", 0, 0, 10, job_created_at_ms=first["created_at_ms"])
    app, _ = worker(db, amqp_url)
    assert app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key) == "succeeded"
    # Deleted and submitted again with the same Idempotency-Key: same id, another target.
    for collection in (JOBS, SHARDS, CHECKPOINTS):
        db[collection].delete_many({"job_id": "job"} if collection != JOBS else {"_id": "job"})
    again = seed_job(db, "job", {**spec(10), "target_collection": "out2"})
    db[JOBS].update_one({"_id": "job"}, {"$set": {"created_at_ms": first["created_at_ms"] + 1}})
    seed_shard(db, "job", 0, 0, 10, job_created_at_ms=first["created_at_ms"] + 1)

    assert app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key) == "succeeded"  # the same process

    assert again["spec"]["target_collection"] == "out2"
    assert db["out2"].count_documents({}) == 10 and db["out"].count_documents({}) == 10


def test_a_first_claim_left_to_run_alone_adopts_its_checkpoint_before_its_run(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    seed_job(db, "job", spec(300, batch_size=100))
    small, large = seed_shard(db, "job", 0, 0, 50), seed_shard(db, "job", 1, 50, 300)  # 250 records: three batches
    app, _ = worker(db, amqp_url)

    assert app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=[small, large]) == "2 succeeded"

    for key, batches in ((small, 1), (large, 3)):
        checkpoint = db[CHECKPOINTS].find_one({"shard_key": key})
        assert checkpoint["fencing_token"] == 1 and checkpoint["batches"] == batches and checkpoint["done"]
    assert db["out"].count_documents({}) == 300
    # A newer holder's checkpoint: the bundle's first claim does not run the shard.
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30)
    seed_job(db, "job2", spec(300, batch_size=100))
    alone = seed_shard(db, "job2", 0, 0, 250)
    claim = leases.claim_waiting([alone])[alone]
    db[CHECKPOINTS].update_one({"shard_key": alone}, {"$set": {"fencing_token": 5}})
    adopted, lost = leases.adopt_all([claim])
    assert adopted == [] and lost == [claim]


def test_a_bundle_runs_every_shard_to_its_own_end_with_one_event_each(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 5)
    app, _ = worker(db, amqp_url)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)

    assert result == "5 succeeded"
    assert db["out"].count_documents({}) == 50
    for key in keys:
        shard = db[SHARDS].find_one({"_id": key})
        assert shard["state"] == ShardState.SUCCEEDED and shard["totals"]["records_written"] == 10
        assert db[CHECKPOINTS].find_one({"shard_key": key})["records_done"] == 10
    assert sorted(e["shard_key"] for e in events(amqp_url)) == keys
    # Delivered again (the ack was lost): nothing is run twice, each end is announced again.
    assert app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys) == "5 already_done"
    assert db["out"].count_documents({}) == 50


def test_a_failing_shard_of_a_bundle_waits_for_its_retry_and_the_others_go_on(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 4, fail_at_key=15, failure="retryable")  # in shard 1
    app, _ = worker(db, amqp_url)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)

    assert result == "1 retry_scheduled, 3 succeeded"
    states = {key: db[SHARDS].find_one({"_id": key})["state"] for key in keys}
    assert states == {keys[0]: "SUCCEEDED", keys[1]: "RETRY", keys[2]: "SUCCEEDED", keys[3]: "SUCCEEDED"}
    assert sorted(e["shard_key"] for e in events(amqp_url)) == [keys[0], keys[2], keys[3]]


def test_a_shard_of_a_bundle_that_is_not_waiting_is_claimed_as_its_own_task_would_be(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3)
    # Shard 1's holder died: RUNNING under an expired lease (taken over), shard 2 is held by a live one.
    db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"state": ShardState.RUNNING, "lease_until": now_ms() - 1000, "taken_by": "gone"}})
    db[SHARDS].update_one({"_id": keys[2]}, {"$set": {"state": ShardState.RUNNING, "lease_until": now_ms() + 60_000, "taken_by": "alive"}})
    app, _ = worker(db, amqp_url)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)

    assert result == "1 held_elsewhere, 2 succeeded"
    assert db[SHARDS].find_one({"_id": keys[1]})["state"] == ShardState.SUCCEEDED
    assert db[SHARDS].find_one({"_id": keys[2]})["taken_by"] == "alive"


def test_at_the_end_of_its_slice_a_bundle_hands_back_what_it_did_not_run_and_re_sends_the_rest(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 4, delay_ms_per_record=30)  # 300 ms a shard
    app, _ = worker(db, amqp_url, slice_s=0.2)

    task = app.tasks[TASK_RUN_SHARDS]
    # As a worker runs a delivery (not called directly: Celery's retry then publishes the re-send).
    task.push_request(id="bundle-1", kwargs={"job_id": "job", "shard_keys": keys}, called_directly=False, retries=0,
                      delivery_info={"routing_key": QUEUE_INGEST, "priority": 2})
    try:
        with pytest.raises(Retry):
            task.run(job_id="job", shard_keys=keys)
    finally:
        task.pop_request()

    assert db[SHARDS].find_one({"_id": keys[0]})["state"] == ShardState.SUCCEEDED
    for key in keys[1:]:  # handed back: claimable at once, their attempt given back
        shard = db[SHARDS].find_one({"_id": key})
        assert shard["state"] == ShardState.RUNNING and shard["lease_until"] == 0 and shard["attempts"] == 0
    # The re-sent task names the rest of the bundle only.
    (message,) = take(amqp_url, QUEUE_INGEST)
    assert message.headers["task"] == TASK_RUN_SHARDS
    assert json.loads(message.body)[1] == {"job_id": "job", "shard_keys": keys[1:], "schema_version": 1}
    # That task runs them (taking the handed-off leases at once) and finishes the job's records.
    app_again, _ = worker(db, amqp_url)
    assert app_again.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys[1:]) == "3 succeeded"
    assert db["out"].count_documents({}) == 40


def test_the_leases_of_bundle_shards_waiting_their_turn_are_kept_alive(db: Database, seed_job: Any, seed_shard: Any) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3)
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=1.0)
    claims = leases.claim_waiting(keys)
    with HeldLeases(leases, list(claims.values()), interval_s=0.2) as held:
        held.started(claims[keys[0]])  # its own run (and Heartbeat) renews it from here
        time.sleep(2.0)  # twice the TTL
        alive = {key: db[SHARDS].find_one({"_id": key})["lease_until"] > now_ms() for key in keys}
    assert alive == {keys[0]: False, keys[1]: True, keys[2]: True}


def test_a_merged_batch_running_past_the_batch_time_limit_stops_renewing_its_leases(db: Database, seed_job: Any, seed_shard: Any) -> None:
    # A hung read or write in the merged batch: like a single shard's Heartbeat, renewing stops so
    # other workers take the shards over (before, the leases lived on until the soft time limit).
    keys = bundle_job(db, seed_job, seed_shard, 2)
    leases = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=1.0)
    claims = leases.claim_waiting(keys)
    with HeldLeases(leases, list(claims.values()), interval_s=0.2, batch_time_limit_s=0.5) as held:
        with held.in_batch():
            for _ in range(8):  # eight steps (shard reads) of 0.2 s: 1.6 s in all, each within the limit
                held.lap()
                time.sleep(0.2)
            assert not held.overran()
            steady = {key: db[SHARDS].find_one({"_id": key})["lease_until"] > now_ms() for key in keys}
            time.sleep(2.5)  # one step past the limit, then past the TTL
            assert held.overran()
            alive = {key: db[SHARDS].find_one({"_id": key})["lease_until"] > now_ms() for key in keys}
            held.lap()  # the hung step returned at last: the leases stay given up
            time.sleep(0.6)
            after = {key: db[SHARDS].find_one({"_id": key})["lease_until"] > now_ms() for key in keys}
    assert steady == {keys[0]: True, keys[1]: True}  # renewed all along (past the TTL of 1 s)
    assert alive == after == {keys[0]: False, keys[1]: False}


# --- shards read whole by one batch: stored, committed and finished together ---------------------


def runner_over(db: Database) -> ShardRunner:
    return ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", ttl_s=30), jobs=db[JOBS], shards=db[SHARDS],
        records_db=db, source_db=db, heartbeat_interval_s=5, slice_s=600,
    )


def test_one_batch_shards_of_a_bundle_are_started_stored_committed_and_finished_in_five_round_trips(
    observed: tuple[Database, Commands], seed_job: Any, seed_shard: Any
) -> None:
    db, commands = observed
    keys = bundle_job(db, seed_job, seed_shard, 8)
    runner = runner_over(db)
    claims = runner.leases.claim_waiting(keys)

    commands.names.clear()
    done = run_in_one_batch(runner, [claims[key] for key in keys], max_attempts=3)

    assert [(o.kind, o.claim.shard_key, o.records) for o in done.outcomes] == [("succeeded", key, 10) for key in keys]
    assert not done.failures and not done.rest
    # The job read once per process; attempts counted, a cancel looked for, records stored,
    # checkpoints committed, shards finished.
    assert commands.names == ["find jobs", "update shards", "find jobs", "insert out", "update checkpoints", "update shards"]
    for index, key in enumerate(keys):
        checkpoint = db[CHECKPOINTS].find_one({"shard_key": key})
        assert checkpoint["cursor"] == (index + 1) * 10 and checkpoint["done"] and checkpoint["batches"] == 1
        assert checkpoint["records_done"] == checkpoint["records_written"] == 10 and checkpoint["fencing_token"] == 1
        shard = db[SHARDS].find_one({"_id": key})
        assert shard["state"] == ShardState.SUCCEEDED and shard["taken_by"] is None and shard["ran_by"] == "worker-a"
        assert shard["attempts"] == 1 and shard["bundle_claim"] is None
        assert shard["totals"]["records_done"] == 10 and shard["totals"]["batches"] == 1
    assert db["out"].count_documents({}) == 80


def test_records_a_dead_earlier_attempt_stored_are_counted_as_redone_on_their_own_shard_only(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3, key_prefix="rec")
    runner = runner_over(db)
    claims = runner.leases.claim_waiting(keys)
    # Shard 1's earlier attempt stored 4 of its records, then died before its commit.
    db["out"].insert_many([{"_id": f"rec-{key:012d}"} for key in range(10, 14)])

    done = run_in_one_batch(runner, [claims[key] for key in keys], max_attempts=3)

    assert [o.kind for o in done.outcomes] == ["succeeded"] * 3
    redone = [db[CHECKPOINTS].find_one({"shard_key": key})["records_redone"] for key in keys]
    written = [db[CHECKPOINTS].find_one({"shard_key": key})["records_written"] for key in keys]
    assert redone == [0, 4, 0] and written == [10, 6, 10]
    assert db["out"].count_documents({}) == 30


def test_a_shard_taken_over_meanwhile_is_not_committed_by_the_bundle_and_the_others_are(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3)
    runner = runner_over(db)
    claims = runner.leases.claim_waiting(keys)
    # Another worker took shard 2 over (its lease had expired): its checkpoint holds a newer token.
    db[SHARDS].update_one({"_id": keys[2]}, {"$set": {"taken_by": "worker-b"}, "$inc": {"fencing_token": 1}})
    db[CHECKPOINTS].update_one({"shard_key": keys[2]}, {"$inc": {"fencing_token": 1}})

    done = run_in_one_batch(runner, [claims[key] for key in keys], max_attempts=3)

    assert [(o.kind, o.claim.shard_key) for o in done.outcomes] == [("succeeded", keys[0]), ("succeeded", keys[1])]
    assert [c.shard_key for c in done.unstarted] == [keys[2]]  # its start refused by the token: nothing read or stored
    taken = db[SHARDS].find_one({"_id": keys[2]})
    assert taken["state"] == ShardState.RUNNING and taken["taken_by"] == "worker-b" and taken["attempts"] == 0
    assert db[CHECKPOINTS].find_one({"shard_key": keys[2]})["batches"] == 0  # its holder commits it, not this bundle


def test_shards_larger_than_one_batch_resumed_ones_and_other_write_modes_are_left_to_run_one_by_one(
    db: Database, seed_job: Any, seed_shard: Any
) -> None:
    seed_job(db, "job", spec(300, batch_size=100))
    small, large = seed_shard(db, "job", 0, 0, 50), seed_shard(db, "job", 1, 50, 300)  # 250 records: three batches
    runner = runner_over(db)
    claims = runner.leases.claim_waiting([small, large])

    done = run_in_one_batch(runner, [claims[small], claims[large]], max_attempts=3)
    assert [o.claim.shard_key for o in done.outcomes] == [small] and [c.shard_key for c in done.rest] == [large]

    db[JOBS].update_one({"_id": "job"}, {"$set": {"spec.write_mode": "upsert"}})
    upsert = runner_over(db)  # a fresh process's cache of the job
    assert run_in_one_batch(upsert, [claims[large]], max_attempts=3).rest == [claims[large]]


def test_a_frontier_lane_runs_its_items_a_block_of_about_one_batch_at_a_time(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str, test_env: Any
) -> None:
    job_spec = {**spec(200), "sharding": {"strategy": "lease_frontier", "shards": 1, "item_size": 10}}
    seed_job(db, "job", job_spec)
    db[JOBS].update_one({"_id": "job"}, {"$set": {"shard_count": 20}})
    keys = [seed_shard(db, "job", i, i * 10, i * 10 + 10, state=ShardState.PLANNED) for i in range(20)]
    commands = Commands()
    client: MongoClient = MongoClient(test_env.mongodb_uri, event_listeners=[commands], tz_aware=True)
    try:
        app, _ = worker(client[db.name], amqp_url)
        assert app.tasks[TASK_RUN_FRONTIER](job_id="job", lane=0) == "drained"
    finally:
        client.close()

    assert all(db[SHARDS].find_one({"_id": key})["state"] == ShardState.SUCCEEDED for key in keys)
    assert db["out"].count_documents({}) == 200
    # Blocks of 100 // 10 = 10 items: two merged inserts for twenty items.
    assert commands.names.count("insert out") == 2
    assert sorted(e["shard_key"] for e in events(amqp_url)) == keys


# --- faults (found by a break-it review): crashes, slices, foreign keys, cancels -----------------


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
        with pytest.raises(Retry):  # the slice's end: the rest is re-sent
            task.run(job_id="job", shard_keys=keys)
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
    thread.join(timeout=60)
    assert not thread.is_alive()

    states = [db[SHARDS].find_one({"_id": key})["state"] for key in keys]
    assert states.count(ShardState.SUCCEEDED) <= 1, (results, states, db["out"].count_documents({}))


def test_a_bundle_with_an_unknown_shard_key_runs_the_others_and_dead_letters_that_one(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 2)
    app, _ = worker(db, amqp_url)
    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=[keys[0], "job:9999", keys[1]])
    assert result == "2 succeeded, 1 unknown_shard"
    (letter,) = dead_letters(amqp_url)
    assert (letter.reason, letter.shard_key) == ("unknown_shard", "job:9999")
    assert RunShard.model_validate(json.loads(letter.original.body)["kwargs"]) == RunShard(job_id="job", shard_key="job:9999")
    assert letter.original.headers == {"task": TASK_RUN_SHARD, "id": letter.original.headers["id"], "bundle_task": TASK_RUN_SHARDS}


def test_a_dead_lettered_shard_of_a_bundle_keeps_its_own_task_as_the_original_not_the_bundle(
    db: Database, seed_job: Any, seed_shard: Any, amqp_url: str
) -> None:
    keys = bundle_job(db, seed_job, seed_shard, 3, fail_at_key=15, failure="non_retryable")  # in shard 1
    app, _ = worker(db, amqp_url)

    result = app.tasks[TASK_RUN_SHARDS](job_id="job", shard_keys=keys)

    assert result == "1 failed, 2 succeeded"
    (letter,) = dead_letters(amqp_url)
    assert letter.shard_key == keys[1] and db[SHARDS].find_one({"_id": keys[1]})["dead_letter_id"] == letter.dead_letter_id
    body = json.loads(letter.original.body)
    assert body["task"] == TASK_RUN_SHARD and RunShard.model_validate(body["kwargs"]) == RunShard(job_id="job", shard_key=keys[1])
    assert letter.original.headers["bundle_task"] == TASK_RUN_SHARDS


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

    results = {key: app.tasks[TASK_RUN_SHARD](job_id="job", shard_key=key) for key in keys[1:]}  # the reaper's RunShards
    assert set(results.values()) == {"succeeded"}, results
