"""Issue 16 / 15 end to end, every service a process of its own: a schedule's overlap policy
(`skip`, `buffer_one`) against jobs slower than the schedule's interval, and a job's webhook
received by a local HTTP server that answers 500 first, then 200, with a valid signature."""

import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from cairn_contracts.clock import stored_ms
from cairn_contracts.webhooks import SIGNATURE_HEADER, verify
from cairn_testkit.webhook_receiver import WebhookReceiver
from harness import System, dump

SECRET = "e2e-webhook-secret"
# One shard of 400 records at 10 ms each: about 4 s of work, four times the schedules' interval.
SLOW = {"pipeline": "synthetic", "params": {"count": 400, "delay_ms_per_record": 10}, "sharding": {"shards": 1}}


@pytest.fixture(scope="module")
def ops_system(system_factory: Callable[..., System]) -> System:
    return system_factory(
        "ops",
        overrides={
            "CAIRN_WEBHOOK_SECRET": SECRET,
            "CAIRN_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",  # the receiver listens on 127.0.0.1
            "CAIRN_WEBHOOK_POLL_S": "0.3",
            "CAIRN_WEBHOOK_BASE_DELAY_S": "0.5",
        },
    )


def wait_for(what: str, condition: Callable[[], Any], system: System, timeout_s: float = 120) -> Any:
    return system.wait_for(condition, what, timeout_s, poll_s=0.2)


def run_overlapping_schedule(system: System, overlap: str, runs: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """An every-second schedule of SLOW jobs, paused once `runs` jobs exist and all have finished:
    (the schedule, its jobs by run number, every view of the schedule seen meanwhile)."""
    seen: list[dict[str, Any]] = []
    job = {**SLOW, "name": f"overlap {overlap} {uuid.uuid4().hex[:6]}", "target_collection": f"e2e_overlap_{overlap}"}
    with system.client() as client:
        created = client.post("/v1/schedules", json={"kind": "interval", "interval_s": 1, "overlap": overlap, "job": job})
        assert created.status_code == 201, created.text
        url = created.json()["url"]

        def enough_runs() -> bool:
            seen.append(client.get(url).json())
            return system.db.jobs.count_documents({"schedule_id": created.json()["id"]}) >= runs

        wait_for(f"{runs} runs of the {overlap} schedule", enough_runs, system)
        assert client.post(f"{url}/pause").status_code == 200
        schedule_id = created.json()["id"]
        wait_for("its jobs finish", lambda: system.db.jobs.count_documents({"schedule_id": schedule_id, "state": {"$nin": ["SUCCESS", "FAILURE", "CANCELLED"]}}) == 0, system)
        final = client.get(url).json()
        client.delete(url)
    jobs = sorted(system.db.jobs.find({"schedule_id": schedule_id}), key=lambda j: j["schedule_run"])
    return final, jobs, seen


def assert_never_overlapped(jobs: list[dict[str, Any]]) -> None:
    for previous, following in zip(jobs, jobs[1:], strict=False):
        finished_ms, created_ms = stored_ms(previous["finished_at"]), following["created_at_ms"]
        assert finished_ms is not None and created_ms >= finished_ms, dump(jobs)


def test_skip_starts_no_run_while_the_previous_one_runs(ops_system: System) -> None:
    final, jobs, seen = run_overlapping_schedule(ops_system, "skip", runs=2)

    assert [j["state"] for j in jobs] == ["SUCCESS"] * len(jobs), dump(jobs)
    assert_never_overlapped(jobs)
    assert final["skipped_runs"] >= 2  # about 4 due runs fell inside each 4 s job
    assert not any(view["buffered_run"] for view in seen)
    assert [j["schedule_run"] for j in jobs] == list(range(1, len(jobs) + 1))  # skipped runs take no number


def test_buffer_one_keeps_one_run_and_starts_it_when_the_previous_one_ends(ops_system: System) -> None:
    final, jobs, seen = run_overlapping_schedule(ops_system, "buffer_one", runs=3)

    assert [j["state"] for j in jobs] == ["SUCCESS"] * len(jobs), dump(jobs)
    assert_never_overlapped(jobs)
    assert any(view["buffered_run"] for view in seen)  # a run waited while a job ran
    assert final["skipped_runs"] >= 1  # only one waits: the others were skipped
    assert [j["schedule_run"] for j in jobs] == list(range(1, len(jobs) + 1))


def test_a_webhook_is_retried_after_a_500_and_received_signed(ops_system: System) -> None:
    system = ops_system
    with WebhookReceiver([500, 200]) as receiver, system.client() as client:
        body = {"pipeline": "synthetic", "params": {"count": 200}, "name": f"hooked {uuid.uuid4().hex[:6]}", "callback_url": receiver.url}
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        finished = wait_for("the job finishes", lambda: (s := client.get(f"/v1/jobs/{job_id}").json())["state"] == "SUCCESS" and s, system)

        received = receiver.wait_for(2, timeout_s=60)
        delivery = wait_for("the delivery is recorded delivered", lambda: system.db.webhook_deliveries.find_one({"_id": job_id, "state": "delivered"}), system)
        results = client.get("/v1/results", params={"state": "SUCCESS", "limit": 200}).json()["items"]

    assert [r.status for r in received] == [500, 200], received
    for request in received:
        assert verify(SECRET, request.body, request.headers[SIGNATURE_HEADER], time.time()), request.headers
        assert request.headers["Cairn-Webhook-Id"] == job_id
    assert [r.headers["Cairn-Webhook-Attempt"] for r in received] == ["1", "2"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
    # Never blocking the job: it had finished before the first attempt was made.
    assert stored_ms(datetime.fromisoformat(finished["finished_at"])) <= delivery["attempts"][0]["at_ms"]
    item = next(i for i in results if i["id"] == job_id)
    assert item["result"] and item["runtime_s"] is not None and item["failed_shards"] == [] and item["workers"]
