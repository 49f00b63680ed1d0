"""Issue 11 against the running services: bounded plans (item 8), a missing source is a FAILURE or
a 422, never an empty SUCCESS (item 9), and `grep <job id>` over the service logs follows a job
through every service (item 16).

All on the shared system: nothing here breaks a part of it, and every job is a few records.
"""

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cairn_contracts.jobs import MAX_ITEMS_PER_JOB
from harness import System, dump

ENDPOINTS = ["/task/start", "/v1/jobs"]
HUGE_PLAN = {
    "pipeline": "synthetic",
    "params": {"count": 1_000_000_000},
    "sharding": {"strategy": "lease_frontier", "shards": 4, "item_size": 1},
}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --- item 8: a plan is bounded ------------------------------------------------------------------
@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_job_planning_a_billion_items_is_refused_naming_item_size(system: System, path: str) -> None:
    name = unique("huge-plan")
    with system.client() as client:
        response = client.post(path, json={**HUGE_PLAN, "name": name})

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "sharding", "item_size"]
    assert str(MAX_ITEMS_PER_JOB) in error["msg"]
    assert system.db.jobs.count_documents({"name": name}) == 0  # nothing recorded, nothing planned


def test_a_lease_frontier_job_at_a_bounded_plan_is_accepted_and_finishes(system: System) -> None:
    target = unique("e2e_frontier")
    job_id = system.start_job(
        {"pipeline": "synthetic", "params": {"count": 60}, "sharding": {"strategy": "lease_frontier", "shards": 2, "item_size": 10}, "target_collection": target}
    )

    status = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)

    assert status["state"] == "SUCCESS", dump(status)
    assert status["shards"]["total"] == 6 and status["records_done"] == 60
    assert system.records(target).count_documents({}) == 60


# --- item 9: a source that cannot be found --------------------------------------------------------
def mongo_range(collection: str, target: str) -> dict:
    return {"pipeline": "mongo_range", "params": {"collection": collection, "start": 0, "end": 50}, "target_collection": target}


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_mongo_range_job_over_a_missing_collection_is_refused_at_submit(system: System, path: str) -> None:
    missing, target = unique("e2e_no_such_source"), unique("e2e_copy")
    with system.client() as client:
        response = client.post(path, json=mongo_range(missing, target))

    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "params", "collection"]
    assert missing in error["msg"]
    assert system.db.jobs.count_documents({"spec.params.collection": missing}) == 0


def test_a_mongo_range_job_over_an_existing_collection_copies_it(system: System) -> None:
    source, target = unique("e2e_source"), unique("e2e_copy")
    system.records(source).insert_many([{"_id": k, "v": k} for k in range(10, 30)])

    job_id = system.start_job(mongo_range(source, target))
    status = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)

    assert status["state"] == "SUCCESS" and status["records_done"] == 20, dump(status)
    assert system.records(target).count_documents({}) == 20


def test_a_source_missing_when_a_schedule_fires_fails_the_job_and_dead_letters_the_reason(system: System) -> None:
    """Schedules are checked when they fire, not when they are made (their source may come later):
    the job the scheduler creates runs into the missing collection in the worker."""
    missing, target = unique("e2e_gone_source"), unique("e2e_copy")
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    with system.client() as client:
        created = client.post("/v1/schedules", json={"name": unique("missing-source"), "kind": "once", "at": at, "job": mongo_range(missing, target)})
        assert created.status_code == 201, created.text
        schedule_id = created.json()["id"]
        job_id = system.wait_for(
            lambda: (items := client.get("/v1/jobs", params={"schedule_id": schedule_id}).json()["items"]) and items[0]["id"],
            "the schedule's job",
        )

    status = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)

    assert status["state"] == "FAILURE", dump(status)
    assert status["progress"] < 100 and status["records_done"] == 0
    with system.client() as client:
        entries = system.wait_for(
            lambda: client.get("/dlq/entries", params={"job_id": job_id}).json()["items"], "the dead letter", timeout_s=30
        )
    [entry] = entries
    assert entry["reason"] == "non_retryable", dump(entry)
    assert entry["error_type"] == "SourceNotFound" and missing in entry["error_message"], dump(entry)
    assert entry["attempts"] == 1  # not retried: a missing collection does not come back by waiting
    assert system.records(target).count_documents({}) == 0


# --- item 16: `grep <job id> logs/*.log` ------------------------------------------------------
def lines_about(log: Path, job_id: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if job_id in line]


def test_grep_of_a_job_id_follows_the_job_through_gateway_scheduler_and_worker(system: System) -> None:
    job_id = system.start_job({"pipeline": "synthetic", "params": {"count": 40}, "sharding": {"shards": 2}, "target_collection": unique("e2e_grep")})
    assert system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=60)["state"] == "SUCCESS"
    logs = {name: system.services[name].log_path for name in ("gateway", "scheduler", "ingest_worker")}
    # The scheduler writes its SUCCESS line in the same roll-up that makes the status SUCCESS.
    system.wait_for(lambda: any("-> SUCCESS" in line for line in lines_about(logs["scheduler"], job_id)), "the scheduler's SUCCESS line", timeout_s=15)

    found = {name: lines_about(log, job_id) for name, log in logs.items()}

    def has(service: str, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in found[service])

    report = dump(found)
    # Each line carries the job in its log context (`[job=<id> …]` in text, `"job_id"` in JSON),
    # not only in its message: the log store can filter on the field.
    assert all(f"job={job_id}" in line for service in found for line in found[service]), report
    assert has("gateway", r"job \S+ recorded PENDING") and has("gateway", r"StartJob published"), report
    assert has("scheduler", r"planned: 2 range shard\(s\)") and has("scheduler", r"2 shard\(s\) dispatched in 1 task\(s\)"), report
    assert has("scheduler", r"-> SUCCESS"), report
    assert found["ingest_worker"], report


def test_grep_of_a_cancelled_job_shows_the_cancel_in_gateway_and_scheduler(system: System) -> None:
    body = {
        "pipeline": "synthetic", "params": {"count": 400, "delay_ms_per_record": 20}, "sharding": {"shards": 2},
        "batch_size": 20, "target_collection": unique("e2e_grep_cancel"),
    }
    job_id = system.start_job(body)
    system.wait_for(lambda: system.db.shards.count_documents({"job_id": job_id, "state": "RUNNING"}), "a running shard", timeout_s=60)
    with system.client() as client:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert system.wait_for_state(job_id, {"CANCELLED"}, timeout_s=60)["state"] == "CANCELLED"
    scheduler_log = system.services["scheduler"].log_path
    system.wait_for(lambda: any("-> CANCELLED" in line for line in lines_about(scheduler_log, job_id)), "the scheduler's CANCELLED line", timeout_s=15)

    gateway = lines_about(system.services["gateway"].log_path, job_id)
    scheduler = lines_about(scheduler_log, job_id)
    assert any("cancel of job" in line and "requested" in line for line in gateway), dump(gateway)
    assert any("cancel of job" in line and "applied" in line for line in scheduler), dump(scheduler)
    assert any("-> CANCELLED" in line for line in scheduler), dump(scheduler)
