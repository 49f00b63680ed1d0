"""Hostile input and the API's truths over real HTTP, against the running services (issue 11,
items 6, 7, 14, 15): a clear 4xx naming the field, never a 500; 409 where the outcome is known;
a command's outcome readable; metrics at /metrics itself."""

import json
import uuid
from datetime import UTC, datetime

import httpx

from harness import System


def test_metrics_are_served_at_slash_metrics_without_a_redirect(system: System) -> None:
    for path in ("/metrics", "/metrics/"):
        response = httpx.get(f"{system.base_url}{path}", timeout=10)  # no redirect followed, as plain curl

        assert response.status_code == 200, (path, response.status_code, response.headers)
        assert response.headers["content-type"].startswith("text/plain")
        assert "cairn_http_requests_total" in response.text


def test_hostile_json_is_a_422_naming_the_field_in_valid_json(system: System) -> None:
    jobs_before = system.db.jobs.count_documents({})
    cases = [
        ("/v1/jobs", '{"pipeline": "synthetic", "params": {"count": 5}, "name": "a\\ud800"}', ["body", "name"]),
        ("/task/start", '{"pipeline": "synthetic", "params": {"count": NaN}}', ["body", "params", "count"]),
        ("/v1/jobs", '{"pipeline": "synthetic", "params": {"count": 5, "delay_ms_per_record": Infinity}}', ["body", "params", "delay_ms_per_record"]),
        ("/v1/schedules", '{"kind": "once", "at": "9999-12-31T23:59:59", "job": {"pipeline": "synthetic", "params": {"count": 1}}}', ["body", "at"]),
        ("/dlq/replay", '{"job_id": "\\udfff"}', ["body", "job_id"]),
    ]
    with system.client() as client:
        for path, body, field in cases:
            response = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})

            assert response.status_code == 422, (path, response.status_code, response.text)
            errors = json.loads(response.content.decode("utf-8"))["detail"]
            assert field in [error["loc"] for error in errors], (path, errors)
        assert client.get("/dlq/entries", params={"offset": str(2**63)}).status_code == 422
        assert client.get("/v1/jobs", params={"cursor": "WzFlMzAsIngiXQ"}).status_code == 422  # [1e30,"x"]
    assert system.db.jobs.count_documents({}) == jobs_before


def test_a_dead_letter_command_is_409_while_another_is_pending_and_its_outcome_is_readable(system: System) -> None:
    entry_id = f"dl-e2e-{uuid.uuid4().hex[:8]}"
    system.db.task_errors.insert_one(
        {
            "_id": entry_id, "kind": "service", "status": "open", "reason": "retries_exhausted", "error_type": "RetryableError",
            "job_id": f"job-{entry_id}", "shard_key": f"job-{entry_id}:0000", "tenant": "default", "attempts": 3,
            "created_at": datetime.now(UTC), "replays": [],
        }
    )  # its shard is not recorded: the DLQ handler refuses to replay it, and says why
    with system.client() as client:
        accepted = client.post(f"/dlq/entries/{entry_id}/replay")
        assert accepted.status_code == 202, accepted.text
        command_url = accepted.json()["command_url"]

        second = client.post(f"/dlq/entries/{entry_id}/replay")
        if second.status_code != 409:  # the handler may have handled the first already: then it is open again
            assert second.status_code == 202 and client.get(command_url).json()["status"] == "done", second.text

        refused = system.wait_for(
            lambda: (body := client.get(command_url).json())["status"] == "done" and body, "the replay command's outcome", timeout_s=30
        )
        assert refused["outcome"] == "refused" and "not recorded" in refused["detail"], refused
        assert refused["entry_status"] == "open"

        discard = client.post(f"/dlq/entries/{entry_id}/discard", json={"note": "no shard"})
        assert discard.status_code == 202, discard.text
        discarded = system.wait_for(
            lambda: (body := client.get(discard.json()["command_url"]).json())["status"] == "done" and body, "the discard's outcome", timeout_s=30
        )
        assert (discarded["outcome"], discarded["entry_status"]) == ("discarded", "discarded")
        assert client.post(f"/dlq/entries/{entry_id}/replay").status_code == 409
        assert client.get("/dlq/commands/no-such-command").status_code == 404


def test_cancel_of_a_cancelled_job_is_409(system: System) -> None:
    job_id = system.start_job({"pipeline": "synthetic", "params": {"count": 200_000, "delay_ms_per_record": 0.05}, "name": f"c-{uuid.uuid4().hex[:6]}"})
    with system.client() as client:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        system.wait_for_state(job_id, {"CANCELLED", "SUCCESS", "FAILURE"}, timeout_s=60)

        again = client.post(f"/v1/jobs/{job_id}/cancel")

    assert again.status_code == 409, again.text
    assert again.json()["loc"] == ["path", "job_id"]
