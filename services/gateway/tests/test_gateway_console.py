"""The web console's fragments and actions through ASGI against this run's MongoDB-wire server,
RabbitMQ vhost and Redis: they answer what the public API answers for the caller's key (status,
tenancy, scopes), escape what they show, and draw a bar per shard. The browser itself is driven in
tests-e2e/test_console.py."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pymongo.database import Database

from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS, JobRecord

SPEC = {"pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 2}}


@pytest.fixture
def clients(client_for) -> Callable[..., httpx.AsyncClient]:
    return lambda tenant, scopes=("submit", "read"): client_for(tenant, scopes)


def running_job(db: Database, tenant: str, name: str) -> str:
    """A STARTED job of 2 range shards over [0, 1000): shard 0 half done and running, shard 1 done."""
    started = datetime.now(UTC) - timedelta(seconds=20)
    record = JobRecord.new({**SPEC, "name": name}, tenant, now=started - timedelta(seconds=1))
    document = record.to_document()
    # As the scheduler's roll-up leaves it: shard 1 counted, a snapshot that sees shard 0 running.
    document.update(
        state=str(JobState.STARTED), started_at=started, shard_count=2, records_total=1000, weight_total=1000,
        counts={"shards_succeeded": 1, "records_done": 500, "records_written": 500, "weight_done": 500},
        shard_states={str(ShardState.RUNNING): 1},
        progress={"percent": 75.0, "records_done": 750, "at_ms": int(started.timestamp() * 1000)},
    )
    db[JOBS].insert_one(document)
    for index, (state, cursor, done) in enumerate([(ShardState.RUNNING, 250, 250), (ShardState.SUCCEEDED, 1000, 500)]):
        key = f"{record.id}:{index:04d}"
        finished = started + timedelta(seconds=10) if state == ShardState.SUCCEEDED else None
        db[SHARDS].insert_one(
            {"_id": key, "shard_key": key, "job_id": record.id, "index": index, "state": str(state), "attempts": 1,
             "range_start": index * 500, "range_end": (index + 1) * 500, "records_done": done, "records_written": done,
             "started_at": started, "finished_at": finished}
        )
        db[CHECKPOINTS].insert_one({"_id": f"{key}/main", "shard_key": key, "job_id": record.id, "sub_key": "main",
                                    "cursor": cursor, "records_done": done, "range_start": index * 500, "range_end": (index + 1) * 500})
    return record.id


async def test_pages_are_shells_and_fragments_answer_as_the_api_does(clients) -> None:
    anonymous, reader = clients(None), clients("console-a", ("read",))
    page = await anonymous.get("/console/")
    assert page.status_code == 200 and "/console/static/htmx-2.0.11.min.js" in page.text
    assert (await anonymous.get("/console/static/console.js")).status_code == 200
    # The API's 401 and 403, rendered: no key, and a key without the admin (DLQ) / operator scope.
    no_key = await anonymous.get("/console/f/jobs")
    assert no_key.status_code == 401 and "Enter an API key" in no_key.text
    for path, what in (("/console/f/dlq", "dead letters"), ("/console/f/workers", "workers")):
        refused = await reader.get(path)
        assert refused.status_code == 403 and f"may not see {what}" in refused.text, refused.text
    # A bad filter is the API's 422 naming the field.
    bad = await reader.get("/console/f/jobs", params={"state": "NOPE"})
    assert bad.status_code == 422 and "query.state" in bad.text, bad.text
    # Routes of the console are not part of the API's OpenAPI document.
    assert not [path for path in (await anonymous.get("/openapi.json")).json()["paths"] if path.startswith("/console")]


async def test_the_jobs_list_shows_the_tenants_jobs_only_escaped_with_live_progress(clients, db) -> None:
    acme, globex = clients("console-acme"), clients("console-globex")
    job_id = running_job(db, "console-acme", "<img src=x onerror=alert(1)>")
    other = running_job(db, "console-globex", "globex's job")
    listed = await acme.get("/console/f/jobs")
    assert listed.status_code == 200, listed.text
    assert job_id in listed.text and other not in listed.text
    assert "<img src=x" not in listed.text and "&lt;img src=x onerror=alert(1)&gt;" in listed.text
    # Progress comes from the job's detail: 250 + 500 of 1000 keys.
    assert 'style="width: 75.0%"' in listed.text and "750 / 1,000" in listed.text
    assert job_id not in (await globex.get("/console/f/jobs")).text
    filtered = await acme.get("/console/f/jobs", params={"state": "SUCCESS"})
    assert job_id not in filtered.text


async def test_the_job_fragment_draws_a_bar_per_shard_and_its_records_per_second(clients, db) -> None:
    acme = clients("console-acme")
    job_id = running_job(db, "console-acme", "bars")
    answer = await acme.get(f"/console/f/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    html = answer.text
    assert 'data-state="RUNNING"' in html and 'class="fill st-RUNNING" style="width: 50.0%"' in html
    assert 'class="fill st-SUCCEEDED" style="width: 100.0%"' in html
    assert '<polyline points="' in html and "Records/s of this job" in html
    # Another tenant's job is the API's 404.
    assert (await clients("console-globex").get(f"/console/f/jobs/{job_id}")).status_code == 404


async def test_actions_call_the_api_commands(clients, db) -> None:
    acme = clients("console-acme")
    not_json = await acme.post("/console/a/jobs", data={"spec": "{nope"})
    assert not_json.status_code == 422 and "spec: not JSON" in not_json.text
    invalid = await acme.post("/console/a/jobs", data={"spec": '{"pipeline": "synthetic", "params": {"count": -5}}'})
    assert invalid.status_code == 422 and "params" in invalid.text and "count" in invalid.text, invalid.text
    started = await acme.post("/console/a/jobs", data={"spec": '{"pipeline": "synthetic", "name": "from the console", "params": {"count": 10}}'})
    assert started.status_code == 200 and started.headers["HX-Trigger"] == "cairn:changed", started.text
    job_id = started.text.split("job ", 1)[1].split()[0]
    assert db[JOBS].find_one({"_id": job_id})["tenant"] == "console-acme"
    assert f'href="/console/jobs/{job_id}"' in started.text
    cancelled = await acme.post(f"/console/a/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and "cancel of job" in cancelled.text
    assert bool(db[JOBS].find_one({"_id": job_id})["cancel_requested"])
    # The DLQ commands need the admin scope, as in the API.
    refused = await acme.post("/console/a/dlq/no-such-entry/replay")
    assert refused.status_code == 403


async def test_retries_list_the_shards_waiting_with_their_attempt_and_due_time(clients, db) -> None:
    acme = clients("console-acme")
    job_id = running_job(db, "console-acme", "retrying")
    due = datetime.now(UTC) + timedelta(seconds=30)
    key = f"{job_id}:0000"
    db[SHARDS].update_one(
        {"_id": key},
        {"$set": {"state": str(ShardState.RETRY), "attempts": 2, "last_error": "ConnectionError: source away",
                  "retry": {"attempt": 2, "max_attempts": 5, "retry_at_ms": int(due.timestamp() * 1000), "delay_s": 3.5}}},
    )
    db[JOBS].update_one({"_id": job_id}, {"$set": {"state": str(JobState.RETRY)}})
    listed = await acme.get("/console/f/retries")
    assert listed.status_code == 200, listed.text
    assert f'data-retry-shard="{key}"' in listed.text and "2 of 5" in listed.text, listed.text
    assert due.strftime("%Y-%m-%d %H:%M:%S") in listed.text and "ConnectionError: source away" in listed.text
    shown = await acme.get(f"/console/f/jobs/{job_id}")
    assert "Waiting for a retry" in shown.text and "2 of 5" in shown.text
    # Another tenant sees none of it.
    assert key not in (await clients("console-globex").get("/console/f/retries")).text
