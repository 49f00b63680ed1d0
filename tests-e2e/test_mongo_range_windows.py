"""Issue 13 acceptance: `mongo_range` with a datetime cursor in time-window shards, resumed after
a worker is SIGKILLed mid-shard: every source document is stored exactly once.

The source has many documents per timestamp, so a batch boundary falls inside a run of equal
times: the (timestamp, _id) cursor must neither skip nor repeat any of them, across the kill too.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from harness import System, dump

CRASH_ENV = {
    "CAIRN_WORKER_CONCURRENCY": "1",
    "CAIRN_LEASE_TTL_S": "3",
    "CAIRN_HEARTBEAT_INTERVAL_S": "0.5",
    "CAIRN_MAX_ATTEMPTS": "6",
}
T0 = datetime(2026, 6, 1, tzinfo=UTC)
TOTAL = 12_000
PER_SECOND = 7  # documents sharing one timestamp
BATCH = 250


@pytest.fixture(scope="module")
def windows_system(system_factory: Callable[..., System]) -> System:
    return system_factory("windows", workers=2, overrides=CRASH_ENV)


def running_window_of(system: System, job_id: str, worker: str) -> dict | None:
    """A shard the worker is in the middle of: a (timestamp, _id) cursor committed, not done."""
    for shard in system.db.shards.find({"job_id": job_id, "state": "RUNNING"}):
        if not str(shard.get("taken_by") or "").startswith(f"{worker}/"):
            continue
        checkpoint = system.db.checkpoints.find_one({"shard_key": shard["shard_key"]})
        if checkpoint and checkpoint["fencing_token"] == shard["fencing_token"] and checkpoint["batches"] >= 2 and not checkpoint.get("done"):
            return {**shard, "cursor": checkpoint["cursor"]}
    return None


def test_time_window_shards_resume_from_their_timestamp_and_id_cursor_after_a_kill(windows_system: System) -> None:
    system = windows_system
    system.records("events_src").insert_many(
        [{"_id": f"ev-{i:06d}", "created_at": T0 + timedelta(seconds=i // PER_SECOND), "n": i} for i in range(TOTAL)]
    )
    # Outside the window: never copied.
    system.records("events_src").insert_many([{"_id": "early", "created_at": T0 - timedelta(seconds=1)}, {"_id": "late", "created_at": T0 + timedelta(days=1)}])
    until = T0 + timedelta(seconds=TOTAL // PER_SECOND + 1)
    job_id = system.start_job(
        {
            "pipeline": "mongo_range",
            "params": {"collection": "events_src", "time_field": "created_at", "since": T0.isoformat(), "until": until.isoformat()},
            "sharding": {"strategy": "range", "shards": 4},
            "batch_size": BATCH,
            "target_collection": "events_copy",
        }
    )

    shard = system.wait_for(lambda: running_window_of(system, job_id, "worker-1") or running_window_of(system, job_id, "worker-2"), "a worker mid-window", 120)
    worker = "ingest_worker" if str(shard["taken_by"]).startswith("worker-1/") else "ingest_worker_2"
    system.services[worker].kill()
    system.services[worker].start()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    job = system.db.jobs.find_one({"_id": job_id})
    assert job["space"]["kind"] == "time_range" and job["space"]["end"] - job["space"]["start"] == (until - T0).total_seconds() * 1000
    copied = system.records("events_copy")
    assert copied.count_documents({}) == TOTAL
    assert sorted(d["source_id"] for d in copied.find({}, {"source_id": 1})) == [f"ev-{i:06d}" for i in range(TOTAL)]
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    assert all(c["done"] for c in checkpoints), dump(checkpoints)
    assert sum(c["records_done"] for c in checkpoints) == TOTAL  # only committed batches count
    assert sum(c["records_redone"] for c in checkpoints) <= BATCH  # at most the batch in flight at the kill
    assert isinstance(shard["cursor"], list) and len(shard["cursor"]) == 2  # [epoch ms, _id]
    killed = system.db.shards.find_one({"_id": shard["shard_key"]})
    assert killed["state"] == "SUCCEEDED" and killed["fencing_token"] >= 2, dump(killed)
