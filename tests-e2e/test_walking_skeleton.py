"""Issue 2 acceptance: a sharded job flows gateway → RabbitMQ → scheduler → Celery → MongoDB."""

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from cairn_contracts.jobs import JOB_SPEC_ADAPTER
from cairn_contracts.messages import StartJob
from cairn_contracts.topology import QUEUE_INGEST, QUEUE_SCHEDULER_COMMANDS
from cairn_runtime.amqp import Publisher, connect
from harness import System, dump

REPO_ROOT = Path(__file__).resolve().parents[1]


def shard_snapshot(system: System, job_id: str) -> list[dict]:
    fields = {"shard_key": 1, "range_start": 1, "range_end": 1, "state": 1, "attempts": 1, "fencing_token": 1, "queued_at": 1}
    return sorted(system.db.shards.find({"job_id": job_id}, fields), key=lambda s: s["shard_key"])


def republish_start_command(system: System, job_id: str) -> None:
    """Deliver the job's start command again, exactly as the gateway published it."""
    job = system.db.jobs.find_one({"_id": job_id})
    command = StartJob(job_id=job_id, tenant=job["tenant"], spec=JOB_SPEC_ADAPTER.validate_python(job["spec"]))

    async def publish() -> None:
        connection = await connect(system.amqp_url, "e2e-republisher")
        try:
            publisher = await Publisher.open(connection, timeout_s=10)
            await publisher.publish(command, priority=2)
        finally:
            await connection.close()

    asyncio.run(publish())


def test_synthetic_job_of_100k_records_in_8_shards_succeeds(system: System) -> None:
    job_id = system.start_job(
        {
            "name": "e2e 100k",
            "pipeline": "synthetic",
            "params": {"count": 100_000, "record_size": 64, "delay_ms_per_record": 0.05},
            "sharding": {"strategy": "range", "shards": 8},
            "batch_size": 1000,
            "target_collection": "e2e_100k",
        }
    )
    seen: list[tuple[str, float]] = []
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=240, on_status=lambda s: seen.append((s["state"], s["progress"])))

    assert final["state"] == "SUCCESS", dump(final)
    started_progress = [progress for state, progress in seen if state == "STARTED"]
    assert any(0 < p < 100 for p in started_progress), f"never saw STARTED with partial progress: {seen}"
    assert started_progress == sorted(started_progress), f"progress went backwards: {started_progress}"
    assert len(set(started_progress)) >= 2, f"progress did not rise while STARTED: {started_progress}"
    assert final["progress"] == 100.0
    assert final["shards"]["total"] == 8 and final["shards"]["succeeded"] == 8

    assert system.records("e2e_100k").count_documents({}) == 100_000
    assert system.records("e2e_100k").count_documents({"job_id": job_id}) == 100_000
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    assert len(checkpoints) == 8
    for checkpoint in checkpoints:
        assert checkpoint["cursor"] == checkpoint["range_end"], dump(checkpoint)
    assert sum(c["records_done"] for c in checkpoints) == 100_000

    with system.client() as client:
        result = client.get(f"/task/result/{job_id}")
    assert result.status_code == 200
    assert result.json()["result"]["records_written"] == 100_000


def test_the_same_command_delivered_twice_changes_nothing(system: System) -> None:
    job_id = system.start_job(
        {"pipeline": "synthetic", "params": {"count": 20_000}, "sharding": {"shards": 4}, "target_collection": "e2e_twice"}
    )
    # A duplicate delivery while the job is being planned and run...
    republish_start_command(system, job_id)
    system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    system.wait_until_drained(QUEUE_SCHEDULER_COMMANDS)
    system.wait_until_drained(QUEUE_INGEST)
    shards_before = shard_snapshot(system, job_id)
    records_before = system.records("e2e_twice").count_documents({})

    # ...and one after it finished.
    republish_start_command(system, job_id)
    system.wait_until_drained(QUEUE_SCHEDULER_COMMANDS)
    system.wait_until_drained(QUEUE_INGEST)

    assert system.status(job_id)["state"] == "SUCCESS"
    assert len(shards_before) == 4
    assert all(s["attempts"] == 1 for s in shards_before), "a shard was run more than once: " + dump(shards_before)
    assert shard_snapshot(system, job_id) == shards_before
    assert records_before == 20_000
    assert system.records("e2e_twice").count_documents({}) == 20_000


def test_a_non_retryable_error_fails_the_job_and_reaches_task_errors(system: System) -> None:
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 4000, "fail_at_key": 3100, "failure": "non_retryable"},
            "sharding": {"shards": 2},
            "target_collection": "e2e_fail",
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    assert final["state"] == "FAILURE", dump(final)
    failed_shard = f"{job_id}:0001"
    shard = system.db.shards.find_one({"_id": failed_shard})
    assert shard["state"] == "FAILED" and shard["attempts"] == 1, "a non-retryable error must not be retried"

    deadline = time.monotonic() + 30
    while (error := system.db.task_errors.find_one({"job_id": job_id})) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert error is not None, "the dead-lettered shard was not recorded in task_errors"
    assert error["shard_key"] == failed_shard
    assert error["reason"] == "non_retryable"
    assert error["error_type"] == "NonRetryableError"
    assert "3100" in error["error_message"]
    assert system.db.task_errors.count_documents({"job_id": job_id}) == 1

    with system.client() as client:
        result = client.get(f"/task/result/{job_id}").json()
    assert result["state"] == "FAILURE"
    assert result["result"]["failed_shards"] == [failed_shard]
    # The healthy shard still stored all of its records, once each.
    assert system.records("e2e_fail").count_documents({"seq": {"$lt": 2000}}) == 2000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"pipeline": "synthetic", "params": {"count": -5}}, ["body", "params", "count"]),
        ({"pipeline": "synthetic", "params": {"count": 10}, "priority": 9}, ["body", "priority"]),
        ({"pipeline": "synthetic", "params": {"count": 10}, "sharding": {"shards": 0}}, ["body", "sharding", "shards"]),
        ({"pipeline": "no_such_pipeline", "params": {}}, ["body", "pipeline"]),
        ({"pipeline": "synthetic", "params": {"count": 10}, "sharding": {"strategy": "zigzag"}}, ["body", "sharding", "strategy"]),
    ],
)
def test_a_bad_request_is_refused_naming_the_field_and_records_nothing(system: System, body: dict, field: list[str]) -> None:
    jobs_before = system.db.jobs.count_documents({})
    with system.client() as client:
        response = client.post("/task/start", json=body)
    assert response.status_code == 422, response.text
    assert field in [error["loc"] for error in response.json()["detail"]], response.text
    assert system.db.jobs.count_documents({}) == jobs_before


def test_unknown_job_answers_404_and_a_running_job_has_no_result_yet(system: System) -> None:
    with system.client() as client:
        assert client.get("/task/status/does-not-exist").status_code == 404
        assert client.get("/task/result/does-not-exist").status_code == 404
        job_id = system.start_job(
            {"pipeline": "synthetic", "params": {"count": 2000, "delay_ms_per_record": 2}, "target_collection": "e2e_slow"}
        )
        assert client.get(f"/task/result/{job_id}").status_code == 409
    system.wait_for_state(job_id, {"SUCCESS"}, timeout_s=120)


def test_mongo_range_source_copies_every_document_in_its_key_range(system: System) -> None:
    source = system.records("e2e_source")
    source.insert_many([{"_id": f"doc-{i}", "n": i, "name": f"item {i}", "skip": i % 2 == 0} for i in range(6000)])
    job_id = system.start_job(
        {
            "pipeline": "mongo_range",
            "params": {"collection": "e2e_source", "key_field": "n", "start": 1000, "end": 5000, "fields": ["n", "name"]},
            "sharding": {"shards": 4},
            "batch_size": 500,
            "target_collection": "e2e_copied",
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    assert final["state"] == "SUCCESS", dump(final)
    copied = system.records("e2e_copied")
    assert copied.count_documents({}) == 4000
    assert copied.find_one({"_id": "e2e_source:1000"})["name"] == "item 1000"
    assert copied.find_one({"_id": "e2e_source:999"}) is None
    assert "skip" not in copied.find_one({"_id": "e2e_source:4999"})


def test_docker_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
