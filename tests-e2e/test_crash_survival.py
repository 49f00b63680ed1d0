"""Issue 3 acceptance: jobs survive real crashes without losing or doubling a record.

Each test runs a separate system (own vhost or broker, own database) with two ingest worker
processes of one pool process each, so a kill takes out exactly the worker holding a shard.
"""

import os
import random
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cairn_testkit.servers import RabbitNode
from harness import System, dump

BATCH = 1000
# Short leases so a takeover happens within seconds; the scheduler reaps every 2 s.
CRASH_ENV = {
    "CAIRN_WORKER_CONCURRENCY": "1",
    "CAIRN_LEASE_TTL_S": "3",
    "CAIRN_HEARTBEAT_INTERVAL_S": "0.5",
    "CAIRN_MAX_ATTEMPTS": "6",
}


@pytest.fixture(scope="module")
def crash_system(system_factory: Callable[..., System]) -> System:
    return system_factory("crash", workers=2, overrides=CRASH_ENV)


def running_shard_of(system: System, job_id: str, worker: str, min_batches: int) -> dict | None:
    """A shard the worker is in the middle of (at least `min_batches` stored, not at its end)."""
    for shard in system.db.shards.find({"job_id": job_id, "state": "RUNNING"}):
        if not str(shard.get("taken_by") or "").startswith(f"{worker}/"):
            continue
        checkpoint = system.db.checkpoints.find_one({"shard_key": shard["shard_key"]})
        if (
            checkpoint
            and checkpoint["fencing_token"] == shard["fencing_token"]
            and checkpoint["batches"] >= min_batches
        ):
            if checkpoint["cursor"] < checkpoint["range_end"]:
                return shard
    return None


def assert_stored_exactly_once(system: System, job_id: str, collection: str, total: int) -> list[dict]:
    target = system.records(collection)
    assert target.count_documents({}) == total
    assert target.count_documents({"job_id": job_id}) == total
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    for checkpoint in checkpoints:
        assert checkpoint["cursor"] == checkpoint["range_end"], dump(checkpoint)
    # records_done counts only batches whose checkpoint committed: a restart from scratch or a
    # stale writer would push it past the total.
    assert sum(c["records_done"] for c in checkpoints) == total
    return checkpoints


@pytest.mark.parametrize(
    "sharding",
    [
        {"strategy": "range", "shards": 4},
        {"strategy": "hash_mod", "shards": 4},
        {"strategy": "lease_frontier", "shards": 2, "item_size": 20_000},
    ],
    ids=lambda s: s["strategy"],
)
def test_killed_workers_resume_from_their_checkpoints(crash_system: System, sharding: dict) -> None:
    system = crash_system
    total = 200_000
    collection = f"crash_{sharding['strategy']}"
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": total, "record_size": 32, "delay_ms_per_record": 0.15},
            "sharding": sharding,
            "batch_size": BATCH,
            "target_collection": collection,
        }
    )
    rng = random.Random(f"{sharding['strategy']}-{job_id}")
    killed: list[str] = []
    for _ in range(2):
        worker = rng.choice(["ingest_worker", "ingest_worker_2"])
        worker_id = "worker-1" if worker == "ingest_worker" else "worker-2"
        at_batches = rng.randint(1, 6)
        shard = system.wait_for(
            lambda worker_id=worker_id, at_batches=at_batches: running_shard_of(system, job_id, worker_id, at_batches), f"{worker_id} mid-shard", 120
        )
        system.services[worker].kill()
        killed.append(shard["shard_key"])
        system.services[worker].start()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    checkpoints = assert_stored_exactly_once(system, job_id, collection, total)
    # At most the batch in flight is redone per kill.
    redone = sum(c["records_redone"] for c in checkpoints)
    assert redone <= len(killed) * BATCH, f"{redone} records redone for {len(killed)} kills"
    for shard_key in killed:
        shard = system.db.shards.find_one({"_id": shard_key})
        assert shard["state"] == "SUCCEEDED"
        assert shard["fencing_token"] >= 2, f"killed shard {shard_key} was never taken over: {dump(shard)}"


def test_a_frozen_worker_cannot_overwrite_the_shard_it_lost(crash_system: System) -> None:
    system = crash_system
    total = 40_000
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": total, "record_size": 32, "delay_ms_per_record": 0.3},
            "sharding": {"strategy": "range", "shards": 2},
            "batch_size": BATCH,
            "target_collection": "frozen",
        }
    )
    shard = system.wait_for(lambda: running_shard_of(system, job_id, "worker-1", 2), "worker-1 mid-shard", 120)
    frozen = system.services["ingest_worker"]
    frozen.signal_group(signal.SIGSTOP)
    try:
        token = shard["fencing_token"]
        taken_over = system.wait_for(
            lambda: system.db.checkpoints.find_one(
                {"shard_key": shard["shard_key"], "fencing_token": {"$gt": token}, "taken_by": {"$ne": None}}
            ),
            "another worker to take the frozen worker's shard over",
            120,
        )
        assert str(taken_over["taken_by"]).startswith("worker-2/")
    finally:
        frozen.signal_group(signal.SIGCONT)

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=180)
    assert final["state"] == "SUCCESS", dump(final)
    assert_stored_exactly_once(system, job_id, "frozen", total)
    # The woken worker finished its batch and tried to commit it: the fencing token refused it.
    system.wait_for(
        lambda: system.db.shards.find_one({"_id": shard["shard_key"], "fenced_writes": {"$gte": 1}}),
        "a refused late write",
        30,
    )


def test_a_poison_shard_is_dead_lettered_while_the_others_complete(crash_system: System) -> None:
    system = crash_system
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 8000, "fail_at_key": 6500, "failure": "crash"},
            "sharding": {"strategy": "range", "shards": 4},
            "batch_size": 500,
            "target_collection": "poison",
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=240)
    assert final["state"] == "FAILURE", dump(final)
    poison_key = f"{job_id}:0003"
    shard = system.db.shards.find_one({"_id": poison_key})
    assert shard["state"] == "FAILED"
    assert shard["attempts"] == int(CRASH_ENV["CAIRN_MAX_ATTEMPTS"]) + 1, dump(shard)
    error = system.wait_for(
        lambda: system.db.task_errors.find_one({"shard_key": poison_key}), "the poison dead letter", 30
    )
    assert error["reason"] == "poison"
    assert final["shards"]["succeeded"] == 3
    # The other shards stored every record once; the poison shard kept what it had committed.
    assert system.records("poison").count_documents({"seq": {"$lt": 6000}}) == 6000


def test_scheduler_killed_while_planning_loses_and_doubles_nothing(crash_system: System) -> None:
    system = crash_system
    total, shards = 51_200, 512
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": total, "record_size": 16},
            "sharding": {"strategy": "range", "shards": shards},
            "batch_size": 1000,
            "target_collection": "replanned",
        }
    )
    system.wait_for(
        lambda: system.db.shards.count_documents({"job_id": job_id, "state": {"$ne": "PLANNED"}}) > 0,
        "dispatch to start",
        60,
    )
    system.services["scheduler"].kill()
    dispatched_before_kill = system.db.shards.count_documents({"job_id": job_id, "state": {"$ne": "PLANNED"}})
    system.services["scheduler"].start()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert final["state"] == "SUCCESS", dump(final)
    assert 0 < dispatched_before_kill, "the kill must land during dispatch"
    task_keys = [s["shard_key"] for s in system.db.shards.find({"job_id": job_id}, {"shard_key": 1})]
    assert len(task_keys) == shards == len(set(task_keys))
    assert system.db.checkpoints.count_documents({"job_id": job_id}) == shards
    assert_stored_exactly_once(system, job_id, "replanned", total)


@pytest.fixture(scope="module")
def private_broker() -> Iterator[RabbitNode]:
    if os.geteuid() != 0:
        pytest.fail("starting a private RabbitMQ node needs root (the server runs as the rabbitmq user)")
    # Not under pytest's tmp dirs: those are private to root, and the node runs as rabbitmq.
    base_dir = Path(tempfile.mkdtemp(prefix="cairn-rabbit-"))
    node = RabbitNode(base_dir, f"cairn-e2e-{os.getpid()}")
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_rabbitmq_restarted_while_a_job_runs(system_factory: Callable[..., System], private_broker: RabbitNode) -> None:
    system = system_factory(
        "broker",
        amqp_url=private_broker.amqp_url,
        rabbit_node=private_broker.node,
        overrides={"CAIRN_WORKER_CONCURRENCY": "2"},
    )
    total = 60_000
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": total, "record_size": 32, "delay_ms_per_record": 0.2},
            "sharding": {"strategy": "range", "shards": 6},
            "batch_size": BATCH,
            "target_collection": "restarted",
        }
    )
    system.wait_for(
        lambda: system.db.checkpoints.count_documents({"job_id": job_id, "batches": {"$gte": 2}}) >= 1, "progress", 120
    )
    assert system.status(job_id)["state"] == "STARTED", "the restart must land while the job runs"
    private_broker.restart()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    assert_stored_exactly_once(system, job_id, "restarted", total)
    # The system still takes and finishes new work after the restart.
    after = system.start_job({"pipeline": "synthetic", "params": {"count": 3000}, "target_collection": "after_restart"})
    assert system.wait_for_state(after, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "SUCCESS"
