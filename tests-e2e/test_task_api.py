"""Issue 5 acceptance against the running services: idempotent creates under concurrency, tenant
isolation, cooperative cancel, schedules fired exactly once by two schedulers, priorities under
saturation, and property-based fuzzing of the API from its own OpenAPI document."""

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from harness import System, dump

SMALL = {"pipeline": "synthetic", "params": {"count": 400}, "sharding": {"shards": 2}, "batch_size": 100}


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float = 90, *, system: System) -> Any:
    return system.wait_for(condition, what, timeout_s, poll_s=0.2)


def moment(value: Any) -> datetime:
    """A shard timestamp as the server kept it (a date, or text for a $set date on the stand-in)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def job_state(client: httpx.Client, job_id: str) -> str:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()["state"]


# --- idempotency under concurrency ----------------------------------------------------------------
def test_fifty_concurrent_creates_with_one_idempotency_key_give_one_job(system: System) -> None:
    key = f"burst-{uuid.uuid4().hex}"
    body = {**SMALL, "name": f"burst {key}", "target_collection": "e2e_burst"}

    async def burst() -> list[httpx.Response]:
        async with system.async_client() as client:
            return await asyncio.gather(*[client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}) for _ in range(50)])

    answers = asyncio.run(burst())

    assert {a.status_code for a in answers} == {202}, [a.text for a in answers if a.status_code != 202]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1 and sum(a.json()["created"] for a in answers) == 1
    job_id = ids.pop()
    assert system.db.jobs.count_documents({"idempotency_key": key}) == 1
    with system.client() as client:
        wait_for("the job succeeds", lambda: job_state(client, job_id) == "SUCCESS", system=system)
        conflict = client.post("/v1/jobs", json={**body, "priority": 4}, headers={"Idempotency-Key": key})
    assert conflict.status_code == 409
    assert system.records("e2e_burst").count_documents({"job_id": job_id}) == 400


# --- tenants --------------------------------------------------------------------------------------
def test_a_tenant_cannot_read_cancel_list_or_replay_another_tenants_work(system: System) -> None:
    tenant_a, tenant_b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    with system.client_for(tenant_a, "admin") as a, system.client_for(tenant_b, "admin") as b:
        slow = a.post("/v1/jobs", json={**SMALL, "params": {"count": 2000, "delay_ms_per_record": 2}, "target_collection": "e2e_tenant"})
        failing = a.post(
            "/v1/jobs",
            json={"pipeline": "synthetic", "params": {"count": 200, "fail_at_key": 150, "failure": "non_retryable"}, "target_collection": "e2e_tenant_fail"},
        )
        schedule = a.post("/v1/schedules", json={"kind": "interval", "interval_s": 3600, "job": SMALL})
        assert slow.status_code == failing.status_code == 202 and schedule.status_code == 201
        slow_id, failing_id, schedule_url = slow.json()["id"], failing.json()["id"], schedule.json()["url"]
        wait_for("the failing job fails", lambda: job_state(a, failing_id) == "FAILURE", system=system)
        entries = wait_for("its dead letter is recorded", lambda: a.get("/dlq/entries", params={"job_id": failing_id}).json()["items"], system=system)
        entry_id = entries[0]["id"]

        for path in (f"/v1/jobs/{slow_id}", f"/task/status/{slow_id}", f"/v1/jobs/{failing_id}/result", schedule_url, f"/dlq/entries/{entry_id}"):
            assert b.get(path).status_code == 404, path
        assert b.post(f"/v1/jobs/{slow_id}/cancel").status_code == 404
        assert b.post(f"/dlq/entries/{entry_id}/replay").status_code == 404
        assert b.post("/dlq/replay", json={"job_id": failing_id}).json()["matched"] == 0
        assert b.get("/v1/jobs", params={"limit": 200}).json()["items"] == []
        assert b.get("/v1/schedules").json()["items"] == []
        assert b.get("/dlq/entries").json()["items"] == []
        assert b.get("/v1/jobs/counts").json()["total"] == 0

        # ...while tenant A sees and controls all of it.
        assert a.get(f"/dlq/entries/{entry_id}").status_code == 200
        assert {i["id"] for i in a.get("/v1/jobs").json()["items"]} >= {slow_id, failing_id}
        assert system.db.jobs.find_one({"_id": slow_id}).get("cancel_requested") is None
        assert system.db.task_errors.find_one({"_id": entry_id})["status"] == "open"
        assert a.delete(schedule_url).status_code == 204
        wait_for("the slow job ends", lambda: job_state(a, slow_id) == "SUCCESS", system=system)


def test_requests_without_a_valid_key_are_refused(system: System) -> None:
    with system.client(auth=False) as anonymous, system.client("cairn_0000_nope") as forged:
        assert anonymous.get("/v1/jobs").status_code == 401
        assert anonymous.post("/task/start", json=SMALL).status_code == 401
        assert forged.get("/task/status/x").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with system.client_for("default", "read") as reader:
        assert reader.post("/v1/jobs", json=SMALL).status_code == 403


def test_a_key_over_its_rate_limit_is_told_when_to_retry(system: System) -> None:
    token = system.create_key("default", "read", "limited", rate_limit=2)
    with system.client(token) as client:
        statuses = [client.get("/v1/jobs/counts") for _ in range(4)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60


# --- cancel ---------------------------------------------------------------------------------------
def test_a_cancelled_8_shard_job_stops_within_one_batch_per_running_shard(system: System) -> None:
    batch = 200
    body = {
        "name": f"to cancel {uuid.uuid4().hex[:6]}",
        "pipeline": "synthetic",
        "params": {"count": 80_000, "delay_ms_per_record": 0.5},
        "sharding": {"strategy": "range", "shards": 8},
        "batch_size": batch,
        "target_collection": "e2e_cancel",
    }
    with system.client() as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_for("some batches are stored", lambda: system.db.checkpoints.count_documents({"job_id": job_id, "records_done": {"$gt": 0}}) >= 1, system=system)

        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCELLING"
        # Once the scheduler marked every checkpoint, each running shard commits at most the
        # batch it has in flight, sees the mark, and stops.
        wait_for("the cancel reaches every checkpoint", lambda: system.db.checkpoints.count_documents({"job_id": job_id, "cancel_requested": True}) == 8, system=system)
        marked = {c["shard_key"]: c["records_done"] for c in system.db.checkpoints.find({"job_id": job_id})}
        wait_for("the job is CANCELLED", lambda: job_state(client, job_id) == "CANCELLED", system=system)
        result = client.get(f"/v1/jobs/{job_id}/result")

    shards = list(system.db.shards.find({"job_id": job_id}))
    checkpoints = {c["shard_key"]: c for c in system.db.checkpoints.find({"job_id": job_id})}
    assert {s["state"] for s in shards} <= {"CANCELLED", "SUCCEEDED"} and "CANCELLED" in {s["state"] for s in shards}, dump(shards)
    for shard_key, done in marked.items():
        assert checkpoints[shard_key]["records_done"] - done <= batch, dump(checkpoints[shard_key])
    never_started = [s for s in shards if s["attempts"] == 0]
    assert never_started, "every shard had started: the test needs queued shards to cancel"
    assert all(s["state"] == "CANCELLED" and checkpoints[s["shard_key"]]["records_done"] == 0 for s in never_started)
    stored = system.records("e2e_cancel").count_documents({"job_id": job_id})
    assert stored == sum(c["records_done"] for c in checkpoints.values()) < 80_000  # no partial batch
    assert all(c["records_done"] % batch == 0 or c["cursor"] == c["range_end"] for c in checkpoints.values())
    assert result.status_code == 200 and result.json()["result"]["records_done"] == stored


def test_a_job_cancelled_before_it_starts_never_runs(system: System) -> None:
    with system.client() as client:
        job_id = client.post("/v1/jobs", json={**SMALL, "name": f"never {uuid.uuid4().hex}", "target_collection": "e2e_never"}).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")
        wait_for("the job is CANCELLED", lambda: job_state(client, job_id) == "CANCELLED", system=system)
        again = client.post(f"/v1/jobs/{job_id}/cancel")  # nothing left to cancel: told so
        assert again.status_code == 409 and again.json()["loc"] == ["path", "job_id"]
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    stored = system.records("e2e_never").count_documents({"job_id": job_id})
    assert stored <= 200  # at most the one batch per shard that may have begun before the mark


# --- schedules with two schedulers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_schedulers(system_factory: Callable[..., System]) -> System:
    return system_factory("schedulers", schedulers=2)


def test_a_schedule_every_2_seconds_fires_exactly_max_runs_times_with_two_schedulers(two_schedulers: System) -> None:
    system = two_schedulers
    assert system.services["scheduler"].process.poll() is None and system.services["scheduler_2"].process.poll() is None
    with system.client() as client:
        created = client.post(
            "/v1/schedules",
            json={"name": "every 2 s", "kind": "interval", "interval_s": 2, "max_runs": 3, "job": {**SMALL, "target_collection": "e2e_sched"}},
        )
        assert created.status_code == 201, created.text
        url = created.json()["url"]
        final = wait_for("three runs fired", lambda: (s := client.get(url).json())["state"] == "finished" and s, timeout_s=60, system=system)
        jobs = wait_for(
            "the three jobs succeed",
            lambda: (items := client.get("/v1/jobs", params={"schedule_id": final["id"]}).json()["items"])
            and all(i["state"] == "SUCCESS" for i in items) and items,
            system=system,
        )

    assert final["total_runs"] == 3 and final["next_run_at"] is None
    stored = list(system.db.jobs.find({"schedule_id": final["id"]}))
    assert len(jobs) == len(stored) == 3, dump(stored)
    assert sorted(j["schedule_run"] for j in stored) == [1, 2, 3]
    assert sorted(j["idempotency_key"] for j in stored) == [f"schedule:{final['id']}:{n}" for n in (1, 2, 3)]


# --- priorities -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_slot(system_factory: Callable[..., System]) -> System:
    """One worker process running one task at a time: every other task waits in cairn.ingest."""
    return system_factory("priority", overrides={"CAIRN_WORKER_CONCURRENCY": "1"})


def test_with_workers_saturated_critical_shards_start_before_queued_low_ones(one_slot: System) -> None:
    system = one_slot
    low = {
        "name": "low", "pipeline": "synthetic", "priority": 1, "batch_size": 500, "target_collection": "e2e_low",
        "params": {"count": 6 * 2000, "delay_ms_per_record": 1}, "sharding": {"shards": 6},
    }
    critical = {
        "name": "critical", "pipeline": "synthetic", "priority": 4, "batch_size": 500, "target_collection": "e2e_critical",
        "params": {"count": 400}, "sharding": {"shards": 2},
    }
    with system.client() as client:
        low_id = client.post("/v1/jobs", json=low).json()["id"]
        wait_for(
            "one LOW shard runs, the others wait in the queue",
            lambda: system.db.shards.count_documents({"job_id": low_id, "state": "RUNNING"}) == 1
            and system.db.shards.count_documents({"job_id": low_id, "state": "QUEUED"}) == 5,
            system=system,
        )
        critical_id = client.post("/v1/jobs", json=critical).json()["id"]
        wait_for("the CRITICAL shards are queued", lambda: system.db.shards.count_documents({"job_id": critical_id, "state": {"$ne": "PLANNED"}}) == 2, system=system)
        waiting_low = [s["shard_key"] for s in system.db.shards.find({"job_id": low_id, "state": "QUEUED", "attempts": 0})]
        wait_for("both jobs succeed", lambda: job_state(client, low_id) == job_state(client, critical_id) == "SUCCESS", timeout_s=120, system=system)

    assert len(waiting_low) >= 3, "the LOW shards were not waiting any more: nothing to overtake"
    started = {s["shard_key"]: moment(s["started_at"]) for s in system.db.shards.find({"job_id": {"$in": [low_id, critical_id]}})}
    last_critical = max(started[k] for k in started if k.startswith(critical_id))
    first_waiting_low = min(started[k] for k in waiting_low)
    assert last_critical < first_waiting_low, dump(sorted(started.items(), key=lambda kv: kv[1]))


# --- fuzzing ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzed(system_factory: Callable[..., System]) -> System:
    """A system of its own whose jobs never run (its worker is stopped): fuzzed jobs are recorded
    and queued, and go when the system does."""
    system = system_factory("fuzz")
    system.services["ingest_worker"].stop()
    return system


def test_the_api_fuzzed_from_its_own_openapi_document_answers_no_5xx_and_keeps_its_schema(fuzzed: System) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{fuzzed.base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]
    headers = {"Authorization": f"Bearer {fuzzed.token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def exercise(case: Any) -> None:
            try:
                case.call_and_validate(base_url=fuzzed.base_url, headers=headers, checks=checks, timeout=30)
            except Exception as error:  # collected, so one run reports every operation that fails
                failures.append(f"{case.method} {case.path}: {error}")
                raise

        try:
            exercise()
        except Exception:
            pass
    assert not failures, "\n\n".join(failures[:10]) + f"\n{fuzzed.logs()}"
