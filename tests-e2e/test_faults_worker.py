"""Issue 11 fault injection, worker delivery (items 1, 2(b), 4): poison task messages, a hung
read, MongoDB going away mid-job. Real processes, a real broker, a real MongoDB-wire server.

Each test runs a system of its own (own vhost and database; the outage test its own MongoDB
stand-in, stopped and restarted for real), so the shared system is never put at risk.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from celery import Celery
from pymongo import MongoClient

from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_contracts.topology import EXCHANGE_TASKS, QUEUE_INGEST, ROUTING_INGEST
from cairn_runtime.amqp import Publisher, connect
from cairn_runtime.celery_config import celery_config
from cairn_testkit.fixtures import AMQP_HOST
from cairn_testkit.servers import MongoStandIn, rabbitmq_vhost
from harness import System, build_system, dump

# A task is interrupted 5 s after it starts (slice 2 s + one batch's 3 s) and killed 5 s later.
HUNG_READ_ENV = {
    "CAIRN_TASK_SLICE_S": "2",
    "CAIRN_BATCH_TIME_LIMIT_S": "3",
    "CAIRN_HARD_TIME_LIMIT_GRACE_S": "5",
    "CAIRN_WORKER_CONCURRENCY": "1",
}

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def worker_faults(system_factory: Callable[..., System]) -> System:
    return system_factory("worker-faults", overrides=HUNG_READ_ENV)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def publish_raw(system: System, messages: list[tuple[bytes, str, dict]]) -> None:
    async def publish() -> None:
        connection = await connect(system.amqp_url, "e2e-poison")
        try:
            publisher = await Publisher.open(connection, timeout_s=10)
            for body, content_type, headers in messages:
                await publisher.publish_bytes(EXCHANGE_TASKS, ROUTING_INGEST, body, headers=headers, content_type=content_type)
        finally:
            await connection.close()

    asyncio.run(publish())


def assert_worker_alive_and_running_jobs(system: System, collection: str) -> None:
    assert system.services["ingest_worker"].process.poll() is None, system.logs()
    job_id = system.start_job(
        {"pipeline": "synthetic", "params": {"count": 300}, "batch_size": 100, "target_collection": collection}
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=60)
    assert final["state"] == "SUCCESS", dump(final)
    assert system.records(collection).count_documents({"job_id": job_id}) == 300


# --- item 1: poison task messages ------------------------------------------------------------------


def test_poison_task_messages_of_every_shape_are_recorded_once_and_the_worker_keeps_consuming(worker_faults: System) -> None:
    system = worker_faults
    marker = uuid.uuid4().hex
    shapes = {
        "array_of_four": b"[1, 2, 3, 4]",
        "empty_array": b"[]",
        "empty_object": b"{}",
        "string": b'"x"',
        "not_json": b"\xff not json \x00",
        "wrong_kwarg_types": b'[[], "job_id", 7]',
        "positional_args": b'[["a", "b"], {}, {}]',
        "huge": b'[[], {"job_id": "' + b"x" * (3 * 1024 * 1024) + b'"}, {}]',
    }
    messages = []
    for name, body in shapes.items():
        headers = {"task": TASK_RUN_SHARD, "id": f"{marker}-{name}", "lang": "py"}
        messages.append((body, "application/json", headers))
    # Twice the same message: what a redelivery looks like (a worker died before its ack).
    messages.append(messages[0])
    messages.append((b"[[], {}, {}]", "application/json", {"task": TASK_RUN_FRONTIER, "marker": marker}))
    publish_raw(system, messages)
    # Well-formed, but naming a shard nobody recorded (twice: same task id).
    sender = Celery("e2e-stray-sender")
    sender.conf.update(celery_config(system.amqp_url))
    stray = {"job_id": f"stray-{marker}", "shard_key": f"stray-{marker}:0000"}
    try:
        for _ in range(2):
            sender.send_task(TASK_RUN_SHARD, kwargs=stray, task_id=f"{marker}-stray")
    finally:
        sender.close()

    def ours() -> list[dict]:
        entries = system.db.task_errors.find({"source_queue": QUEUE_INGEST})
        return [e for e in entries if marker in json.dumps(e.get("original") or {}, default=str)]

    expected = len(shapes) + 1 + 1  # every shape, the frontier task without an id, the stray task
    entries = system.wait_for(lambda: (found := ours()) and len(found) >= expected and found, f"{expected} entries", 90)
    system.wait_until_drained(QUEUE_INGEST)  # every one of them was acked (or dead-lettered by the broker)
    entries = ours()
    assert len(entries) == expected, dump(entries)  # the repeated message and the repeated stray: once each
    violations = [e for e in entries if e["reason"] == "contract_violation"]
    assert len(violations) == len(shapes) + 1 and all(e["error_type"] == "UnreadableMessage" for e in violations)
    (unknown,) = [e for e in entries if e["reason"] == "unknown_shard"]
    assert unknown["shard_key"] == stray["shard_key"] and unknown["job_id"] == stray["job_id"]
    assert_worker_alive_and_running_jobs(system, unique("e2e_after_poison"))


# --- item 2(b): a hung read ------------------------------------------------------------------------


def hung_job(system: System, collection: str) -> str:
    # One batch of 181 records at 10 s each: 30 minutes, past RabbitMQ's consumer_timeout.
    return system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 181, "delay_ms_per_record": 10_000},
            "batch_size": 181,
            "target_collection": collection,
            "retry": {"max_attempts": 2, "base_delay_s": 0.2, "max_delay_s": 0.5},
        }
    )


def test_a_hung_read_is_stopped_by_the_operators_cancel_and_its_lease_is_not_renewed(worker_faults: System) -> None:
    system = worker_faults
    collection = unique("e2e_hung_cancel")
    job_id = hung_job(system, collection)
    system.wait_for(lambda: system.db.shards.find_one({"job_id": job_id, "state": "RUNNING"}), "the hung shard running", 30)
    with system.client() as client:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=60)
    assert final["state"] == "CANCELLED", dump(final)
    shard = system.db.shards.find_one({"job_id": job_id})
    lease_until = shard.get("lease_until") or 0
    time.sleep(3)  # several heartbeats: nobody renews the lease of the cancelled shard
    assert (system.db.shards.find_one({"job_id": job_id}).get("lease_until") or 0) == lease_until
    assert system.records(collection).count_documents({}) == 0  # the hung batch was never stored
    system.wait_until_drained(QUEUE_INGEST, timeout_s=30)  # the delivery did not stay unacked
    assert_worker_alive_and_running_jobs(system, unique("e2e_after_hung_cancel"))


def test_a_read_that_always_hangs_ends_in_failure_through_the_retry_policy(worker_faults: System) -> None:
    system = worker_faults
    collection = unique("e2e_hung_fail")
    job_id = hung_job(system, collection)
    started = time.monotonic()
    # Two attempts, each interrupted by the soft time limit; then the dead-letter queue.
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=90)
    assert final["state"] == "FAILURE", dump(final)
    assert time.monotonic() - started < 90
    entry = system.wait_for(lambda: system.db.task_errors.find_one({"job_id": job_id}), "the dead letter", 30)
    assert entry["error_type"] == "BatchTimedOut" and entry["reason"] == "retries_exhausted", dump(entry)
    assert system.records(collection).count_documents({}) == 0
    system.wait_until_drained(QUEUE_INGEST, timeout_s=30)
    assert_worker_alive_and_running_jobs(system, unique("e2e_after_hung_fail"))


# --- item 4: MongoDB unreachable mid-job ----------------------------------------------------------


@pytest.fixture
def outage_system(test_env, tmp_path: Path) -> Iterator[tuple[System, MongoStandIn]]:
    """A system on a MongoDB stand-in of its own (the session's server is never stopped)."""
    store = MongoStandIn(tmp_path / "nx-outage")
    store.start()
    client = MongoClient(store.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    env = replace(test_env, mongodb_uri=store.uri)
    with contextlib.ExitStack() as stack:
        stack.callback(store.stop)
        stack.callback(client.close)
        vhost = stack.enter_context(rabbitmq_vhost(f"cairn-test-{test_env.run_id}-outage"))
        amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"
        service_env = {**env.service_env(), "CAIRN_MONGODB_DATABASE": "cairn_outage", "CAIRN_AMQP_URL": amqp_url}
        system = build_system(service_env, client["cairn_outage"], vhost, amqp_url, tmp_path / "system", workers=2)
        stack.callback(system.stop_services)
        system.start_services()
        yield system, store


def test_a_store_outage_mid_job_loses_and_doubles_nothing_and_the_job_finishes_soon_after(
    outage_system: tuple[System, MongoStandIn],
) -> None:
    system, store = outage_system
    total = 24_000
    collection = unique("e2e_outage")
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": total, "record_size": 16, "delay_ms_per_record": 0.5},
            # More shards than the 4 pool processes: tasks wait in the queue and are claimed
            # while the store is away (the deliveries the old code acked and dropped).
            "sharding": {"strategy": "range", "shards": 8},
            "batch_size": 500,
            "target_collection": collection,
        }
    )

    def progressed() -> bool:
        return sum(c.get("batches", 0) for c in system.db.checkpoints.find({"job_id": job_id})) >= 4

    system.wait_for(progressed, "the job under way", 60)
    store.stop()
    # A worker (re)started while the store is away must come up and stay up (before: its start-up
    # index creation raised and the process exited).
    system.services["ingest_worker_2"].kill()
    system.services["ingest_worker_2"].start()
    time.sleep(12)
    for name, service in system.services.items():
        assert service.process.poll() is None, f"{name} exited while MongoDB was down\n{system.logs()}"
    store.start()
    back = time.monotonic()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=90)
    # Before: a claimed-or-queued task was acked and dropped; the shard waited 300 s for a redispatch.
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    recovered_s = time.monotonic() - back
    logger.info("job finished %.1f s after MongoDB came back", recovered_s)
    assert recovered_s < 60, "the job took too long to finish after the store came back"
    assert system.records(collection).count_documents({}) == total
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    assert all(c["cursor"] == c["range_end"] for c in checkpoints)
    assert sum(c["records_done"] for c in checkpoints) == total  # nothing counted twice
    for name, service in system.services.items():
        assert service.process.poll() is None, f"{name} exited\n{system.logs()}"
