"""Issue 16 through ASGI against this run's MongoDB-wire server, RabbitMQ vhost and Redis:
GET /v1/results and batch deletes, schedules PUT / batch delete / description / overlap / next
runs, and the job spec's callback URL."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pymongo.database import Database

from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SCHEDULES, SHARDS, TASK_ERRORS, JobRecord

SPEC = {"pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 2}, "priority": 3}
STACK = 'Traceback (most recent call last):\n  File "runner.py", line 10, in run\n    batch = pipeline.read()\n  File "p.py", line 3, in read\n    raise ValueError("bad row 7")\nValueError: bad row 7\n'


def spec(**changes) -> dict:
    return {**SPEC, "name": f"job {uuid.uuid4().hex[:10]}", **changes}

# The gateway's settings in this module (conftest.py `settings`).
GATEWAY_SETTINGS = {"result_ttl_s": 3600}


@pytest.fixture
def clients(client_for) -> Callable[[str], httpx.AsyncClient]:
    return lambda tenant: client_for(tenant, ("submit", "read"))


@pytest.fixture
def acme(clients) -> httpx.AsyncClient:
    return clients("acme")


@pytest.fixture
def globex(clients) -> httpx.AsyncClient:
    return clients("globex")


def finished_job(db: Database, tenant: str, state: JobState, *, minutes_ago: int = 10, runtime_s: int = 90, **result) -> str:
    created = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    record = JobRecord.new(spec(), tenant, now=created)
    document = record.to_document()
    started, finished = created + timedelta(seconds=5), created + timedelta(seconds=5 + runtime_s)
    document.update(state=str(state), started_at=started, finished_at=finished, finished_at_ms=int(finished.timestamp() * 1000),
                    result=result or {"records_done": 10}, shard_count=2)
    db[JOBS].insert_one(document)
    return record.id


def shard(db: Database, job_id: str, index: int, state: ShardState, **fields) -> str:
    key = f"{job_id}:{index:04d}"
    db[SHARDS].insert_one({"_id": key, "shard_key": key, "job_id": job_id, "index": index, "state": str(state), "attempts": 3, **fields})
    db[CHECKPOINTS].insert_one({"_id": f"{key}/main", "shard_key": key, "job_id": job_id, "sub_key": "main"})
    return key


# --- /v1/results ---------------------------------------------------------------------------------
async def test_results_list_finished_jobs_with_runtime_failed_shards_and_workers(acme, globex, db) -> None:
    failed = finished_job(db, "acme", JobState.FAILURE, minutes_ago=5, runtime_s=90)
    ok_key = shard(db, failed, 0, ShardState.SUCCEEDED, ran_by="worker-a@host")
    bad_key = shard(db, failed, 1, ShardState.FAILED, ran_by="worker-b@host", last_error="ValueError: bad row 7", dead_letter_id="dl-1")
    db[TASK_ERRORS].insert_one({"_id": "dl-1", "job_id": failed, "shard_key": bad_key, "error_type": "ValueError", "error_message": "bad row 7", "stack": STACK, "created_at": datetime.now(UTC)})
    succeeded = finished_job(db, "acme", JobState.SUCCESS, minutes_ago=8, records_done=20)
    also_failed = finished_job(db, "acme", JobState.FAILURE, minutes_ago=6)
    its_key = shard(db, also_failed, 0, ShardState.FAILED, ran_by="worker-c@host", last_error="KeyError: 'x'")
    running = JobRecord.new(spec(), "acme")
    db[JOBS].insert_one(running.to_document())
    other = finished_job(db, "globex", JobState.SUCCESS)

    response = await acme.get("/v1/results", params={"limit": 200})

    assert response.status_code == 200, response.text
    items = {item["id"]: item for item in response.json()["items"]}
    assert failed in items and succeeded in items and running.id not in items and other not in items
    item = items[failed]
    assert (item["state"], item["runtime_s"], item["workers"], item["failed_shard_count"]) == ("FAILURE", 90.0, ["worker-a@host", "worker-b@host"], 1)
    (failure,) = item["failed_shards"]
    assert (failure["shard_key"], failure["error_type"], failure["worker"], failure["dead_letter_id"]) == (bad_key, "ValueError", "worker-b@host", "dl-1")
    assert failure["traceback"].splitlines()[-1] == "ValueError: bad row 7" and "Traceback" not in failure["traceback"]
    assert items[succeeded]["result"] == {"records_done": 20} and items[succeeded]["failed_shards"] == []
    assert [f["shard_key"] for f in items[also_failed]["failed_shards"]] == [its_key] and items[also_failed]["workers"] == ["worker-c@host"]
    assert items[also_failed]["failed_shards"][0]["traceback"] is None  # no dead letter recorded for it
    assert ok_key not in str(item["failed_shards"])
    only_failures = (await acme.get("/v1/results", params={"state": "FAILURE", "limit": 200})).json()["items"]
    assert {i["state"] for i in only_failures} == {"FAILURE"}


async def test_results_are_paged_without_repeats(acme, db) -> None:
    tenant_jobs = {finished_job(db, "acme", JobState.SUCCESS, minutes_ago=m) for m in range(30, 35)}
    seen: list[str] = []
    cursor = None
    while True:
        page = (await acme.get("/v1/results", params={"limit": 2, **({"cursor": cursor} if cursor else {})})).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert tenant_jobs <= set(seen) and len(seen) == len(set(seen))


@pytest.mark.parametrize(
    "params, location",
    [({"state": "STARTED"}, ["query", "state"]), ({"limit": 0}, ["query", "limit"]), ({"cursor": "!!"}, ["query", "cursor"])],
)
async def test_bad_results_queries_are_422_naming_the_field(acme, params, location) -> None:
    response = await acme.get("/v1/results", params=params)
    assert response.status_code == 422, response.text
    assert location in [e["loc"] for e in response.json()["detail"]], response.text


async def test_batch_delete_of_results_and_jobs(acme, globex, db) -> None:
    first, second = finished_job(db, "acme", JobState.SUCCESS), finished_job(db, "acme", JobState.FAILURE)
    shard(db, second, 0, ShardState.FAILED)
    running = JobRecord.new(spec(), "acme")
    db[JOBS].insert_one(running.to_document())
    theirs = finished_job(db, "globex", JobState.SUCCESS)

    dropped = await acme.post("/v1/results/batch-delete", json={"ids": [first, running.id, theirs], "scope": "result"})

    assert dropped.status_code == 200, dropped.text
    assert (dropped.json()["deleted"], dropped.json()["not_found"], list(dropped.json()["refused"])) == ([first], [theirs], [running.id])
    assert (await acme.get(f"/v1/jobs/{first}/result")).status_code == 410
    assert "result" in db[JOBS].find_one({"_id": theirs})

    removed = await acme.post("/v1/results/batch-delete", json={"ids": [first, second], "scope": "job"})

    assert removed.json()["deleted"] == [first, second]
    assert db[JOBS].count_documents({"_id": {"$in": [first, second]}}) == 0 and db[SHARDS].count_documents({"job_id": second}) == 0
    assert db[JOBS].count_documents({"_id": running.id}) == 1


@pytest.mark.parametrize(
    "body, location",
    [({"ids": []}, ["body", "ids"]), ({"ids": ["x"], "scope": "everything"}, ["body", "scope"]), ({"ids": ["x"] * 201}, ["body", "ids"])],
)
async def test_a_bad_batch_delete_is_422_naming_the_field(acme, body, location) -> None:
    response = await acme.post("/v1/results/batch-delete", json=body)
    assert response.status_code == 422, response.text
    assert location in [e["loc"] for e in response.json()["detail"]], response.text


# --- schedules -----------------------------------------------------------------------------------
async def test_description_overlap_put_and_next_runs(acme, db) -> None:
    created = await acme.post(
        "/v1/schedules", json={"name": "hourly", "description": "refresh the mirror", "overlap": "buffer_one", "kind": "interval", "interval_s": 3600, "job": spec()}
    )
    assert created.status_code == 201, created.text
    schedule = created.json()
    assert (schedule["description"], schedule["overlap"], schedule["skipped_runs"], schedule["buffered_run"]) == ("refresh the mirror", "buffer_one", 0, False)

    upcoming = await acme.get(f"{schedule['url']}/next", params={"n": 5})
    assert upcoming.status_code == 200, upcoming.text
    runs = [datetime.fromisoformat(r) for r in upcoming.json()["runs"]]
    assert len(runs) == 5 and runs[0] == datetime.fromisoformat(schedule["next_run_at"])
    assert {b - a for a, b in zip(runs, runs[1:], strict=False)} == {timedelta(hours=1)}

    replaced = await acme.put(schedule["url"], json={"kind": "cron", "cron": "30 2 * * *", "job": spec(), "max_runs": 3})
    assert replaced.status_code == 200, replaced.text
    body = replaced.json()
    assert (body["kind"], body["interval_s"], body["description"], body["overlap"], body["name"], body["max_runs"]) == ("cron", None, None, "skip", None, 3)
    runs = (await acme.get(f"{schedule['url']}/next", params={"n": 10})).json()["runs"]
    assert len(runs) == 3 and all(datetime.fromisoformat(r).astimezone(UTC).strftime("%H:%M") == "02:30" for r in runs)  # max_runs bounds them

    patched = await acme.patch(schedule["url"], json={"overlap": "cancel_other", "description": "d2"})
    assert (patched.json()["overlap"], patched.json()["description"]) == ("cancel_other", "d2")
    await acme.post(f"{schedule['url']}/pause")
    assert (await acme.get(f"{schedule['url']}/next")).json()["runs"] == []


@pytest.mark.parametrize(
    "method, suffix, body, params, location",
    [
        ("post", "", {"overlap": "sometimes"}, None, ["body", "overlap"]),
        ("post", "", {"description": "x" * 2001}, None, ["body", "description"]),
        ("put", "/{id}", {"overlap": "never"}, None, ["body", "overlap"]),
        ("put", "/{id}", {"kind": "interval"}, None, ["body", "interval_s"]),
        ("patch", "/{id}", {"overlap": 3}, None, ["body", "overlap"]),
        ("get", "/{id}/next", None, {"n": 0}, ["query", "n"]),
        ("get", "/{id}/next", None, {"n": 101}, ["query", "n"]),
    ],
)
async def test_bad_schedule_input_is_422_naming_the_field(acme, db, method, suffix, body, params, location) -> None:
    schedule = (await acme.post("/v1/schedules", json={"kind": "interval", "interval_s": 60, "job": spec()})).json()
    before = db[SCHEDULES].find_one({"_id": schedule["id"]})
    path = "/v1/schedules" + suffix.replace("{id}", schedule["id"])
    full = {"kind": "interval", "interval_s": 60, "job": spec(), **(body or {})} if method in ("post", "put") else body
    if body == {"kind": "interval"}:
        full = {"kind": "interval", "job": spec()}

    response = await acme.request(method.upper(), path, json=full, params=params)

    assert response.status_code == 422, response.text
    assert location in [e["loc"] for e in response.json()["detail"]], response.text
    assert db[SCHEDULES].find_one({"_id": schedule["id"]}) == before


async def test_schedules_batch_delete_and_tenancy(acme, globex, db) -> None:
    mine = [(await acme.post("/v1/schedules", json={"kind": "interval", "interval_s": 60, "job": spec()})).json()["id"] for _ in range(2)]
    theirs = (await globex.post("/v1/schedules", json={"kind": "interval", "interval_s": 60, "job": spec()})).json()["id"]

    response = await acme.post("/v1/schedules/batch-delete", json={"ids": [*mine, theirs, "nope"]})

    assert response.status_code == 200, response.text
    assert (sorted(response.json()["deleted"]), response.json()["not_found"]) == (sorted(mine), [theirs, "nope"])
    assert db[SCHEDULES].count_documents({"_id": {"$in": mine}}) == 0 and db[SCHEDULES].count_documents({"_id": theirs}) == 1
    assert (await globex.put(f"/v1/schedules/{mine[0]}", json={"kind": "interval", "interval_s": 60, "job": spec()})).status_code == 404
    assert (await acme.get(f"/v1/schedules/{theirs}/next")).status_code == 404


# --- callback URL --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "javascript:alert(1)", "http://user:secret@example.com/", "https://" + "a" * 2050 + ".com/", "not a url"]
)
async def test_a_bad_callback_url_is_422_naming_the_field(acme, db, url) -> None:
    response = await acme.post("/v1/jobs", json=spec(callback_url=url))
    assert response.status_code == 422, response.text
    assert ["body", "callback_url"] in [e["loc"] for e in response.json()["detail"]], response.text


async def test_a_callback_url_is_kept_in_the_spec(acme, db) -> None:
    response = await acme.post("/v1/jobs", json=spec(callback_url="https://hooks.example.com/cairn?team=7"))
    assert response.status_code == 202, response.text
    assert db[JOBS].find_one({"_id": response.json()["id"]})["spec"]["callback_url"] == "https://hooks.example.com/cairn?team=7"
