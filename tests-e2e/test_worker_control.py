"""Issue 16, worker control: Celery remote control over RabbitMQ through the gateway, against a
real worker process (list, inspect, pool grow/shrink, per-shard terminate and revoke, shutdown).

One system of its own (own vhost and database): the tests change its worker's pool and shut the
worker down last. A shard stuck in a 60 s batch is terminated: it must stop within seconds (the
worker's active list empties long before the batch would have ended), its lease released, and
its records committed once.
"""

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flaky_source import FIXED_SOURCES

from harness import System, dump

HOSTNAME = "cairn-ingest@worker-1"
# Ten records of 6 s each: one batch runs 60 s unless it is stopped.
STUCK_PARAMS = {"delay_ms_per_record": 6000}
# A terminated run must be gone well before its 60 s batch could have ended.
STOPPED_WITHIN_S = 20


@pytest.fixture(scope="module")
def control_system(system_factory: Callable[..., System]) -> System:
    return system_factory("control", overrides={"CAIRN_WORKER_CONCURRENCY": "2"})


def workers(system: System) -> list[dict[str, Any]]:
    with system.client() as client:
        response = client.get("/v1/workers")
    assert response.status_code == 200, response.text
    return response.json()


def worker(system: System) -> dict[str, Any] | None:
    return next((w for w in workers(system) if w["hostname"] == HOSTNAME), None)


def active(system: System) -> list[dict[str, Any]]:
    with system.client() as client:
        response = client.get(f"/v1/workers/{HOSTNAME}/inspect/active")
    assert response.status_code == 200, response.text
    return response.json()


def start_stuck_job(system: System, prefix: str, collection: str) -> tuple[str, str]:
    """A one-shard job whose every batch takes 60 s; returns (job id, shard key) once it runs."""
    params = {"count": 30, "key_prefix": prefix, **STUCK_PARAMS}
    job_id = system.start_job({"pipeline": "synthetic", "params": params, "batch_size": 10, "target_collection": collection})
    shard = system.wait_for(
        lambda: system.db["shards"].find_one({"job_id": job_id, "state": "RUNNING"}), f"a running shard of {job_id}", timeout_s=60
    )
    return job_id, shard["shard_key"]


def test_workers_are_listed_with_pool_and_heartbeat(control_system: System) -> None:
    system = control_system
    listed = system.wait_for(lambda: (w := worker(system)) and w["heartbeat_age_s"] is not None and w, "the worker's heartbeat")
    assert listed["worker_id"] == "worker-1"
    assert listed["pool"]["max_concurrency"] == 2, dump(listed)
    assert len(listed["pool"]["processes"]) == 2, dump(listed)
    assert listed["heartbeat_age_s"] < 30, dump(listed)
    # A key without the operator scope may not see or touch workers.
    with system.client_for("default", "submit,read") as client:
        assert client.get("/v1/workers").status_code == 403
        assert client.post(f"/v1/workers/{HOSTNAME}/pool/grow", json={"n": 1}).status_code == 403
    # An operator key may (reads and commands alike); terminating an unknown shard is a 404.
    with system.client(system.create_key("default", "operator", "e2e operator")) as client:
        assert client.get("/v1/workers").status_code == 200
        assert client.post("/v1/shards/no-such-shard/terminate", json={"then": "ready"}).status_code == 404
    # Unknown worker and inspect kind: answered, never a 500.
    with system.client() as client:
        assert client.get("/v1/workers/cairn-ingest@nobody/inspect/active").status_code == 404
        assert client.get(f"/v1/workers/{HOSTNAME}/inspect/everything").status_code == 422
        assert client.post(f"/v1/workers/{HOSTNAME}/pool/grow", json={"n": 0}).status_code == 422


def test_pool_grows_and_shrinks(control_system: System) -> None:
    system = control_system
    with system.client() as client:
        response = client.post(f"/v1/workers/{HOSTNAME}/pool/grow", json={"n": 1})
        assert response.status_code == 200, response.text
    system.wait_for(lambda: len((worker(system) or {}).get("pool", {}).get("processes", [])) == 3, "a pool of 3 processes")
    with system.client() as client:
        response = client.post(f"/v1/workers/{HOSTNAME}/pool/shrink", json={"n": 1})
        assert response.status_code == 200, response.text
        # This worker has no autoscaler: the command is refused, with the worker's reason.
        refused = client.post(f"/v1/workers/{HOSTNAME}/pool/autoscale", json={"max": 4, "min": 1})
        assert refused.status_code == 409, refused.text
    before = set(system.wait_for(
        lambda: (w := worker(system)) and len(w["pool"]["processes"]) == 2 and w["pool"]["processes"], "a pool of 2 processes"
    ))
    # Pool restart: Celery's prefork pool replaces each process once it has finished its next task
    # (the restart itself sends one a no-op): a new process appears, and the pool still runs jobs
    # (the tests below).
    with system.client() as client:
        response = client.post(f"/v1/workers/{HOSTNAME}/pool/restart")
        assert response.status_code == 200, response.text
    system.wait_for(
        lambda: (w := worker(system)) and len(w["pool"]["processes"]) == 2 and set(w["pool"]["processes"]) - before,
        "a new pool process",
    )


def test_terminate_stops_a_stuck_batch_now_and_the_shard_reruns_from_its_checkpoint(control_system: System) -> None:
    system = control_system
    prefix = f"stuck{uuid.uuid4().hex[:6]}"
    collection = f"terminated_{prefix}"
    job_id, shard_key = start_stuck_job(system, prefix, collection)
    # The worker reports the run: its task in `inspect active`, the lease in `running_shards`.
    system.wait_for(lambda: any(t["shard_key"] == shard_key for t in active(system)), "the run in inspect active")
    assert shard_key in (worker(system) or {}).get("running_shards", []), dump(workers(system))
    token_before = int(system.db["shards"].find_one({"shard_key": shard_key})["fencing_token"])

    # The rerun must be quick: the source is "fixed" (no delay) before the stuck run is stopped.
    system.records(FIXED_SOURCES).insert_one({"_id": prefix})
    asked = time.monotonic()
    with system.client() as client:
        response = client.post(f"/v1/shards/{shard_key}/terminate", json={"then": "ready"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["state"] == "RETRY" and answer["interrupted"] is True, dump(answer)
    assert answer["fencing_token"] == token_before + 1
    assert answer["worker"].startswith("worker-1/")

    # Stopped now: the worker no longer runs the stuck task, long before its batch would end.
    system.wait_for(
        lambda: not any(t["task_id"] == answer["reply"]["task_id"] for t in active(system)),
        "the terminated task to leave the worker",
        timeout_s=STOPPED_WITHIN_S,
    )
    assert time.monotonic() - asked < STOPPED_WITHIN_S

    # Back to ready: the scheduler sends the shard again, it reruns from its checkpoint and succeeds.
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=90)
    assert final["state"] == "SUCCESS", dump(final)
    shard = system.db["shards"].find_one({"shard_key": shard_key})
    checkpoint = system.db["checkpoints"].find_one({"shard_key": shard_key})
    # Nothing committed twice: every batch counted once, every record stored once.
    assert checkpoint["records_done"] == 30 and checkpoint["batches"] == 3, dump(checkpoint)
    assert system.records(collection).count_documents({}) == 30
    assert shard["terminations"] == 1 and shard["terminated_then"] == "ready", dump(shard)
    assert shard["attempts"] == 1, dump(shard)  # the terminated run's attempt was given back
    assert shard["fencing_token"] > token_before + 1  # the rerun claimed it under a newer token


def test_terminate_as_cancelled_ends_the_job_and_revoke_cancels_a_waiting_shard(control_system: System) -> None:
    system = control_system
    prefix = f"cancel{uuid.uuid4().hex[:6]}"
    job_id, shard_key = start_stuck_job(system, prefix, f"terminated_{prefix}")
    system.wait_for(lambda: any(t["shard_key"] == shard_key for t in active(system)), "the run in inspect active")
    with system.client() as client:
        response = client.post(f"/v1/shards/{shard_key}/terminate", json={"then": "cancelled"})
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "CANCELLED"
        # Terminal now: terminating or revoking it again is a conflict, never a 500.
        assert client.post(f"/v1/shards/{shard_key}/terminate", json={"then": "ready"}).status_code == 409
        assert client.post(f"/v1/shards/{shard_key}/revoke").status_code == 409
        assert client.post("/v1/shards/no-such-shard/terminate", json={"then": "ready"}).status_code == 404
        assert client.post(f"/v1/shards/{shard_key}/terminate", json={"then": "later"}).status_code == 422
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=STOPPED_WITHIN_S)
    assert final["state"] == "CANCELLED", dump(final)
    system.wait_for(lambda: not any(t["shard_key"] == shard_key for t in active(system)), "the run to stop", timeout_s=STOPPED_WITHIN_S)
    assert system.db["checkpoints"].find_one({"shard_key": shard_key})["records_done"] == 0

    # Revoke: a shard not started yet is cancelled and its queued task never runs it. Both pool
    # processes are held by stuck runs, so the third shard waits in the queue.
    prefix = f"revoke{uuid.uuid4().hex[:6]}"
    params = {"count": 30, "key_prefix": prefix, **STUCK_PARAMS}
    job_id = system.start_job(
        {"pipeline": "synthetic", "params": params, "batch_size": 10, "sharding": {"shards": 3}, "target_collection": f"revoked_{prefix}"}
    )
    shards = system.wait_for(
        lambda: (found := list(system.db["shards"].find({"job_id": job_id}))) and len(found) == 3 and found,
        "the job's three shards",
    )
    system.wait_for(lambda: system.db["shards"].count_documents({"job_id": job_id, "state": "RUNNING"}) == 2, "two running shards")
    waiting = system.db["shards"].find_one({"job_id": job_id, "state": {"$in": ["PLANNED", "QUEUED"]}})
    assert waiting is not None, dump(shards)
    with system.client() as client:
        response = client.post(f"/v1/shards/{waiting['shard_key']}/revoke")
        assert response.status_code == 200, response.text
        for shard in system.db["shards"].find({"job_id": job_id, "state": "RUNNING"}):
            assert client.post(f"/v1/shards/{shard['shard_key']}/terminate", json={"then": "cancelled"}).status_code == 200
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=STOPPED_WITHIN_S)
    assert final["state"] == "CANCELLED", dump(final)
    assert system.db["shards"].find_one({"shard_key": waiting["shard_key"]})["state"] == "CANCELLED"
    assert system.records(f"revoked_{prefix}").count_documents({}) == 0


def test_terminating_a_lease_frontier_item_leaves_its_lane_running(control_system: System) -> None:
    """A lane's task names no shard: the worker finds the run by its pool process. The lane is
    not revoked (Celery's revoke would drop its re-sends): it goes on with the next items."""
    system = control_system
    prefix = f"lane{uuid.uuid4().hex[:6]}"
    collection = f"terminated_{prefix}"
    params = {"count": 30, "key_prefix": prefix, **STUCK_PARAMS}
    job_id = system.start_job(
        {
            "pipeline": "synthetic", "params": params, "batch_size": 10,
            "sharding": {"strategy": "lease_frontier", "shards": 1, "item_size": 10}, "target_collection": collection,
        }
    )
    item = system.wait_for(lambda: system.db["shards"].find_one({"job_id": job_id, "state": "RUNNING"}), "a running item", timeout_s=60)
    lane = system.wait_for(lambda: next((t for t in active(system) if t["job_id"] == job_id), None), "the lane in inspect active")
    assert lane["task"] == "cairn.ingest.run_frontier" and lane["shard_key"] is None, dump(lane)
    system.records(FIXED_SOURCES).insert_one({"_id": prefix})
    with system.client() as client:
        response = client.post(f"/v1/shards/{item['shard_key']}/terminate", json={"then": "ready"})
    assert response.status_code == 200 and response.json()["interrupted"] is True, response.text
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=STOPPED_WITHIN_S * 3)
    assert final["state"] == "SUCCESS", dump(final)
    assert system.records(collection).count_documents({}) == 30
    batches = [c["batches"] for c in system.db["checkpoints"].find({"job_id": job_id})]
    assert batches == [1, 1, 1], batches  # every item committed once
    # The lane's own task went on (not revoked): the worker's revoked list does not name it.
    with system.client() as client:
        revoked = client.get(f"/v1/workers/{HOSTNAME}/inspect/revoked").json()
    assert lane["task_id"] not in (revoked or []), dump(revoked)


def test_processed_counts_and_graceful_shutdown(control_system: System) -> None:
    system = control_system
    listed = worker(system)
    assert listed is not None and sum(listed["processed"].values()) >= 2, dump(listed)
    with system.client() as client:
        response = client.post(f"/v1/workers/{HOSTNAME}/shutdown")
        assert response.status_code == 200, response.text
    process = system.services["ingest_worker"].process
    assert process is not None
    system.wait_for(lambda: process.poll() is not None, "the worker to exit", timeout_s=60)
    assert process.returncode == 0, system.logs()
    system.wait_for(lambda: worker(system) is None, "the worker to leave the list")
