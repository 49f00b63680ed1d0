"""Issue 11 fault-injection suite: long backoff retries (item 2a).

A retry that waits must not be held by a worker: an unacknowledged delivery kept for the backoff
would pass RabbitMQ's `consumer_timeout` (30 min) and the broker would close the worker's channel.
The retry waits in MongoDB (shard `RETRY`, `next_retry_at_ms`); the worker acks its delivery;
the scheduler sends the task when the retry is due.

The observable: while a shard waits an hour for its retry, the ingest queue holds no message at
all, ready or unacknowledged (`rabbitmqctl list_queues messages` counts both; a worker's ETA task
is an unacknowledged delivery). Then the test makes the retry due in MongoDB, as the clock would
an hour later, and the job finishes, each record stored once.

One system of its own (own vhost and database), so no other test's task is on its queue.
"""

import time
from collections.abc import Callable
from typing import Any

import pytest

from cairn_contracts.topology import QUEUE_INGEST
from harness import System, dump

HOUR_S = 3600
LONG_BACKOFF = {"max_attempts": 3, "base_delay_s": HOUR_S, "max_delay_s": HOUR_S}


@pytest.fixture(scope="module")
def retries_system(system_factory: Callable[..., System]) -> System:
    return system_factory("retries")


def failing_once(collection: str, **extra: Any) -> dict[str, Any]:
    """1,000 synthetic records in batches of 250 whose key 600 fails retryably on the first attempt."""
    return {
        "pipeline": "synthetic",
        "params": {"count": 1000, "fail_at_key": 600, "failure": "retryable", "fail_times": 1},
        "batch_size": 250,
        "retry": LONG_BACKOFF,
        "target_collection": collection,
        **extra,
    }


def waiting_shard(system: System, job_id: str) -> dict:
    """The job's shard waiting for its retry, kept waiting a full hour from now (the backoff is
    random in [0, 1 h]: this takes the rare short draw out of the test)."""
    shard = system.wait_for(
        lambda: system.db.shards.find_one({"job_id": job_id, "state": "RETRY"}), f"a shard of {job_id} in RETRY", timeout_s=60
    )
    held = system.db.shards.update_one(
        {"_id": shard["_id"], "state": "RETRY"}, {"$set": {"next_retry_at_ms": int(time.time() * 1000) + HOUR_S * 1000}}
    )
    if not held.matched_count:
        pytest.skip("the random backoff was shorter than this test could observe")
    return system.db.shards.find_one({"_id": shard["_id"]})


def assert_no_delivery_held(system: System) -> None:
    """Nothing on the ingest queue, ready or held unacknowledged by a worker, for a while."""
    system.wait_until_drained(QUEUE_INGEST, timeout_s=30)
    for _ in range(3):
        time.sleep(1)
        assert system.queue_depth(QUEUE_INGEST) == 0, "a delivery is held while the retry waits"


def make_due(system: System, shard: dict) -> None:
    made = system.db.shards.update_one(
        {"_id": shard["_id"], "state": "RETRY"}, {"$set": {"next_retry_at_ms": int(time.time() * 1000)}}
    )
    assert made.matched_count == 1, dump(system.db.shards.find_one({"_id": shard["_id"]}))


def assert_stored_once(system: System, job_id: str, collection: str, total: int) -> None:
    assert system.records(collection).count_documents({"job_id": job_id}) == total
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    assert sum(c["records_written"] for c in checkpoints) == total, dump(checkpoints)
    assert sum(c["records_done"] for c in checkpoints) == total, dump(checkpoints)


def scheduler_counter(system: System, reason: str) -> float:
    prefix = f'cairn_shard_redispatches_total{{reason="{reason}"}} '
    for line in system.metrics_text("scheduler").splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def test_a_long_backoff_retry_is_not_held_by_a_worker_and_the_scheduler_sends_it_when_due(retries_system: System) -> None:
    system = retries_system
    sent_before = scheduler_counter(system, "retry_due")
    job_id = system.start_job(failing_once("e2e_long_backoff"))
    shard = waiting_shard(system, job_id)
    assert shard["attempts"] == 1 and shard["retry"]["ceiling_s"] == HOUR_S, dump(shard)

    assert_no_delivery_held(system)
    status = system.wait_for_state(job_id, {"RETRY"}, timeout_s=30)
    assert [r["shard_key"] for r in status["retrying"]] == [shard["shard_key"]], dump(status)
    assert system.services["ingest_worker"].process.poll() is None

    make_due(system, shard)
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)
    assert final["state"] == "SUCCESS", dump(final)
    shard = system.db.shards.find_one({"_id": shard["_id"]})
    assert shard["attempts"] == 2 and shard["retry_dispatches"] == 1, dump(shard)
    assert not shard.get("redispatches"), dump(shard)
    assert_stored_once(system, job_id, "e2e_long_backoff", 1000)
    assert scheduler_counter(system, "retry_due") == sent_before + 1
    system.wait_until_drained(QUEUE_INGEST, timeout_s=30)


def test_a_lease_frontier_item_waiting_a_long_backoff_holds_no_runner_and_gets_one_when_due(retries_system: System) -> None:
    system = retries_system
    job_id = system.start_job(
        failing_once("e2e_long_backoff_frontier", sharding={"strategy": "lease_frontier", "shards": 1, "item_size": 250})
    )
    item = waiting_shard(system, job_id)
    assert item["shard_key"] == f"{job_id}:0002", dump(item)  # keys [500, 750) hold key 600
    # The runner went on with the items after it and ended: no lane waits for the retry.
    system.wait_for(
        lambda: system.db.shards.count_documents({"job_id": job_id, "state": "SUCCEEDED"}) == 3, "the other items done"
    )
    assert_no_delivery_held(system)

    make_due(system, item)
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)
    assert final["state"] == "SUCCESS", dump(final)
    item = system.db.shards.find_one({"_id": item["_id"]})
    assert item["attempts"] == 2 and item["retry_dispatches"] == 1, dump(item)
    assert_stored_once(system, job_id, "e2e_long_backoff_frontier", 1000)


def test_short_backoff_retries_are_sent_by_the_scheduler_and_finish_quickly(retries_system: System) -> None:
    system = retries_system
    spec = failing_once("e2e_short_backoff")
    spec["params"]["fail_times"] = 2
    spec["retry"] = {"max_attempts": 3, "base_delay_s": 0.2, "max_delay_s": 0.5}
    job_id = system.start_job(spec)

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)
    assert final["state"] == "SUCCESS", dump(final)
    shard = system.db.shards.find_one({"job_id": job_id})
    assert shard["attempts"] == 3 and [r["attempt"] for r in shard["retries"]] == [1, 2], dump(shard)
    assert shard["retry_dispatches"] == 2, dump(shard)  # each retry sent by the scheduler, once
    assert_stored_once(system, job_id, "e2e_short_backoff", 1000)
    system.wait_until_drained(QUEUE_INGEST, timeout_s=30)
