"""The task API (issue 5) through ASGI with the app's lifespan, against this run's MongoDB-wire
server, RabbitMQ vhost and Redis: keys and scopes, tenants, limits, /v1/jobs, /v1/schedules."""

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis.asyncio as aioredis
from pymongo.database import Database

from cairn_contracts.messages import CancelJob, StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import API_KEYS, CHECKPOINTS, JOB_LOCK_KEY, JOB_TALLIES, JOBS, SCHEDULES, SHARDS
from cairn_contracts.tenancy import tenant_database
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_CONTROL
from cairn_gateway import admin
from cairn_gateway.auth import new_key
from cairn_testkit.aio import drain, next_message

SPEC = {"pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 2}, "priority": 3}


def spec(**changes) -> dict:
    """SPEC with a unique name: an identical unfinished job would be refused by the job lock."""
    return {**SPEC, "name": f"job {uuid.uuid4().hex[:10]}", **changes}

# The gateway's settings in this module (conftest.py `settings`).
GATEWAY_SETTINGS = {"max_body_bytes": 4096, "result_ttl_s": 3600}


def key(db: Database, tenant: str = "acme", scopes: tuple[str, ...] = ("submit", "read"), **options) -> str:
    document, token = new_key(tenant, scopes, f"{tenant} test key", **options)
    db[API_KEYS].insert_one(document)
    return token


@pytest.fixture
def make_client(client_of) -> Callable[[str | None], httpx.AsyncClient]:
    return client_of


@pytest.fixture
def acme(db, make_client) -> httpx.AsyncClient:
    return make_client(key(db, "acme"))


@pytest.fixture
def globex(db, make_client) -> httpx.AsyncClient:
    return make_client(key(db, "globex"))


@pytest.fixture
async def start_commands(broker):
    queue = broker.queues[QUEUE_SCHEDULER_COMMANDS]
    await drain(queue)
    return queue


@pytest.fixture
async def control_commands(broker):
    queue = broker.queues[QUEUE_SCHEDULER_CONTROL]
    await drain(queue)
    return queue


@pytest.fixture
async def cache(settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    async for found in client.scan_iter(match=f"{settings.redis_prefix}:*"):
        await client.delete(found)
    await client.aclose()


async def create(client: httpx.AsyncClient, body: dict, **headers: str) -> httpx.Response:
    return await client.post("/v1/jobs", json=body, headers=headers)


def finish(db: Database, job_id: str, state: JobState = JobState.SUCCESS, *, finished_ago_s: float = 0) -> None:
    finished = datetime.now(UTC) - timedelta(seconds=finished_ago_s)
    db[JOBS].update_one(
        {"_id": job_id},
        {"$set": {"state": state, "finished_at": finished, "finished_at_ms": int(finished.timestamp() * 1000), "result": {"records_done": 7}}},
    )


# --- keys and scopes -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/jobs", "/task/status/x", "/v1/schedules", "/dlq/entries", "/v1/jobs/counts"])
async def test_every_endpoint_needs_a_key(make_client, path) -> None:
    response = await make_client(None).get(path)

    assert response.status_code == 401, response.text
    assert response.json()["loc"] == ["header", "Authorization"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_unknown_malformed_and_revoked_keys_are_401(db, make_client, settings) -> None:
    token = key(db)
    key_id = token.split("_")[1]
    tampered = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
    db[API_KEYS].update_one({"_id": key_id}, {"$set": {"revoked_at": datetime.now(UTC).isoformat()}})

    for bad in ("nope", "cairn_", "cairn_deadbeef_secret", tampered, token):
        assert (await make_client(bad).get("/v1/jobs")).status_code == 401, bad


async def test_open_endpoints_need_no_key(make_client) -> None:
    client = make_client(None)

    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200


async def test_scopes_decide_what_a_key_may_do(db, make_client) -> None:
    reader = make_client(key(db, "acme", ("read",)))
    submitter = make_client(key(db, "acme", ("submit",)))
    operator = make_client(key(db, "acme", ("admin",)))

    assert (await reader.get("/v1/jobs")).status_code == 200
    denied = await create(reader, spec())
    assert denied.status_code == 403 and "submit" in denied.json()["detail"]
    assert (await create(submitter, spec())).status_code == 202
    assert (await submitter.get("/v1/jobs")).status_code == 403
    assert (await reader.get("/dlq/entries")).status_code == 403  # dead letters are an admin's
    assert (await operator.get("/dlq/entries")).status_code == 200
    assert (await create(operator, spec())).status_code == 202  # admin implies submit and read


async def test_admin_command_creates_lists_and_revokes_keys(settings, db, monkeypatch, make_client) -> None:
    monkeypatch.setenv("MONGODB_URI", settings.mongodb_uri)
    monkeypatch.setenv("CAIRN_MONGODB_DATABASE", settings.mongodb_database)
    out = io.StringIO()
    with redirect_stdout(out):
        assert admin.main(["create-key", "--tenant", "initech", "--scopes", "admin", "--name", "bootstrap"]) == 0
    token = out.getvalue().strip()
    key_id = token.split("_")[1]

    stored = db[API_KEYS].find_one({"_id": key_id})
    assert stored["tenant"] == "initech" and stored["scopes"] == ["admin"]
    assert token.split("_", 2)[2] not in str(stored)  # only the hash is kept
    assert (await make_client(token).get("/v1/jobs")).status_code == 200
    listing = io.StringIO()
    with redirect_stdout(listing):
        assert admin.main(["list-keys", "--tenant", "initech"]) == 0
    assert key_id in listing.getvalue() and "secret_hash" not in listing.getvalue()
    with redirect_stdout(io.StringIO()):
        assert admin.main(["revoke-key", key_id]) == 0
        assert admin.main(["create-key", "--tenant", "initech", "--scopes", "root"]) == 2
    assert db[API_KEYS].find_one({"_id": key_id})["revoked_at"] is not None


async def test_an_admin_manages_the_keys_of_its_own_tenant(db, make_client, app) -> None:
    operator = make_client(key(db, "acme", ("admin",)))

    created = await operator.post("/v1/keys", json={"scopes": ["read"], "name": "dashboard"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["tenant"] == "acme" and body["scopes"] == ["read"]
    new_client = make_client(body["token"])
    assert (await new_client.get("/v1/jobs")).status_code == 200
    assert body["id"] in [k["id"] for k in (await operator.get("/v1/keys")).json()]
    assert (await operator.delete(f"/v1/keys/{body['id']}")).status_code == 204
    assert (await new_client.get("/v1/jobs")).status_code == 401
    bad = await operator.post("/v1/keys", json={"scopes": ["root"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "scopes"]
    other = make_client(key(db, "globex", ("admin",)))
    assert (await other.delete(f"/v1/keys/{body['id']}")).status_code == 404


# --- limits --------------------------------------------------------------------------------------
async def test_a_key_over_its_rate_limit_gets_429_with_retry_after(db, make_client, cache) -> None:
    client = make_client(key(db, "acme", ("read",), rate_limit_per_minute=3))

    answers = [await client.get("/v1/jobs") for _ in range(5)]

    statuses = [a.status_code for a in answers]
    # three per minute; a window boundary in the middle can only let one more through
    assert statuses.count(429) >= 1 and statuses.count(200) <= 4, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "3 requests per minute" in refused.json()["detail"]
    assert (await make_client(key(db, "acme", ("read",))).get("/v1/jobs")).status_code == 200  # per key


async def test_a_body_over_the_limit_is_413_naming_the_limit(acme, db) -> None:
    before = db[JOBS].count_documents({})
    large = spec(name="x" * 150, params={"count": 10, "key_prefix": "p"}) | {"padding": "y" * 5000}

    declared = await acme.post("/v1/jobs", json=large)

    async def chunks():
        for _ in range(10):
            yield b"{" + b" " * 1000

    streamed = await acme.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})

    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "4096 bytes" in response.json()["detail"] and response.json()["loc"] == ["body"]
    assert db[JOBS].count_documents({}) == before


# --- /v1/jobs ------------------------------------------------------------------------------------
async def test_create_answers_202_with_id_and_location_and_publishes_the_command(acme, db, start_commands) -> None:
    response = await create(acme, spec())

    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["url"] == f"/v1/jobs/{body['id']}"
    assert (body["state"], body["created"]) == ("PENDING", True)
    job = db[JOBS].find_one({"_id": body["id"]})
    assert job["tenant"] == "acme" and isinstance(job["created_at_ms"], int)
    command = StartJob.model_validate_json((await next_message(start_commands)).body)
    assert (command.job_id, command.tenant) == (body["id"], "acme")


async def test_fifty_concurrent_creates_with_one_idempotency_key_give_one_job(acme, db, start_commands) -> None:
    idempotency_key = f"burst-{uuid.uuid4().hex}"
    body = spec()

    answers = await asyncio.gather(*[create(acme, body, **{"Idempotency-Key": idempotency_key}) for _ in range(50)])

    assert {a.status_code for a in answers} == {202}, [a.text for a in answers if a.status_code != 202]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.json()["created"] for a in answers) == 1
    assert db[JOBS].count_documents({"tenant": "acme", "idempotency_key": idempotency_key}) == 1
    assert len(await drain(start_commands)) == 1


async def test_a_used_idempotency_key_with_another_body_is_409(acme, db) -> None:
    idempotency_key = f"k-{uuid.uuid4().hex}"
    first = await create(acme, spec(), **{"Idempotency-Key": idempotency_key})

    conflict = await create(acme, spec(priority=1), **{"Idempotency-Key": idempotency_key})

    assert conflict.status_code == 409
    assert conflict.json()["loc"] == ["header", "Idempotency-Key"] and first.json()["id"] in conflict.json()["detail"]


async def test_the_same_idempotency_key_in_another_tenant_is_another_job(acme, globex) -> None:
    idempotency_key = f"shared-{uuid.uuid4().hex}"
    body = spec()

    mine = await create(acme, body, **{"Idempotency-Key": idempotency_key})
    theirs = await create(globex, body, **{"Idempotency-Key": idempotency_key})

    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"] and theirs.json()["created"]


async def test_an_identical_unfinished_job_is_409_and_allowed_again_once_it_finished(acme, db, settings, cache) -> None:
    body = spec()
    first = (await create(acme, body)).json()["id"]
    lock = JOB_LOCK_KEY.format(prefix=settings.redis_prefix, tenant="acme", fingerprint=db[JOBS].find_one({"_id": first})["spec_fingerprint"])
    assert (await cache.get(lock)).decode() == first
    assert 0 < await cache.pttl(lock) <= settings.job_lock_ttl_s * 1000

    refused = await create(acme, body, **{"Idempotency-Key": f"other-{uuid.uuid4().hex}"})
    assert refused.status_code == 409 and first in refused.json()["detail"]
    assert db[JOBS].count_documents({"name": body["name"]}) == 1

    finish(db, first)  # the scheduler would also release the lock; a finished holder is taken over
    again = await create(acme, body)
    assert again.status_code == 202 and again.json()["id"] != first
    assert (await cache.get(lock)).decode() == again.json()["id"]


async def test_list_filters_and_paginates_with_a_cursor(acme, db) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = []
    for number in range(5):
        body = spec(name=f"Report {tag} #{number}", priority=4 if number % 2 else 1)
        ids.append((await create(acme, body)).json()["id"])
    finish(db, ids[0], JobState.FAILURE)

    pages, cursor = [], None
    while True:
        response = await acme.get("/v1/jobs", params={"q": f"report {tag}", "limit": 2, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        pages.append([item["id"] for item in response.json()["items"]])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break

    assert [len(p) for p in pages] == [2, 2, 1]
    assert sum(pages, []) == list(reversed(ids))  # newest first, each once
    critical = (await acme.get("/v1/jobs", params={"q": tag, "priority": 4})).json()["items"]
    assert sorted(i["id"] for i in critical) == sorted([ids[1], ids[3]])
    failed = (await acme.get("/v1/jobs", params={"q": tag, "state": "FAILURE"})).json()["items"]
    assert [i["id"] for i in failed] == [ids[0]]
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert (await acme.get("/v1/jobs", params={"q": tag, "created_after": later})).json()["items"] == []
    assert len((await acme.get("/v1/jobs", params={"q": tag, "created_before": later})).json()["items"]) == 5
    bad = await acme.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]
    assert (await acme.get("/v1/jobs", params={"q": ".*"})).json()["items"] == []  # text, never a pattern


async def test_get_shows_the_job_with_its_shards(acme, db) -> None:
    job_id = (await create(acme, spec())).json()["id"]
    for index in range(2):
        key_ = f"{job_id}:{index:04d}"
        db[SHARDS].insert_one({"_id": key_, "shard_key": key_, "job_id": job_id, "index": index, "state": ShardState.QUEUED, "attempts": 0, "range_start": index * 500, "range_end": (index + 1) * 500})
        db[CHECKPOINTS].insert_one({"_id": f"{key_}/main", "shard_key": key_, "sub_key": "main", "job_id": job_id, "cursor": index * 500 + 100, "range_start": index * 500, "range_end": (index + 1) * 500, "records_done": 100})

    body = (await acme.get(f"/v1/jobs/{job_id}")).json()

    assert body["id"] == job_id and body["spec"]["params"]["count"] == 1000
    assert [s["shard_key"] for s in body["shards"]] == [f"{job_id}:0000", f"{job_id}:0001"]
    assert [s["cursor"] for s in body["shards"]] == [100, 600]
    assert body["records_done"] == 200 and body["progress"] == 20.0


async def test_counts_by_state_include_cancelling(make_client, db) -> None:
    client = make_client(key(db, f"counting-{uuid.uuid4().hex[:6]}"))
    ids = [(await create(client, spec())).json()["id"] for _ in range(3)]
    finish(db, ids[0])
    assert (await client.post(f"/v1/jobs/{ids[1]}/cancel")).status_code == 202

    counts = (await client.get("/v1/jobs/counts")).json()

    assert counts["total"] == 3
    assert (counts["counts"]["SUCCESS"], counts["counts"]["CANCELLING"], counts["counts"]["PENDING"]) == (1, 1, 1)


async def test_cancel_marks_the_job_and_sends_the_command(acme, db, control_commands) -> None:
    job_id = (await create(acme, spec())).json()["id"]

    response = await acme.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 202 and response.json()["state"] == "CANCELLING"
    job = db[JOBS].find_one({"_id": job_id})
    assert job["cancel_requested"] and job["state"] == JobState.PENDING  # (the stand-in hands a $set true back as 1)
    command = CancelJob.model_validate_json((await next_message(control_commands)).body)
    assert (command.job_id, command.tenant) == (job_id, "acme")
    assert (await acme.get(f"/task/status/{job_id}")).json()["state"] == "CANCELLING"
    assert [i["id"] for i in (await acme.get("/v1/jobs", params={"state": "CANCELLING", "limit": 200})).json()["items"]].count(job_id) == 1


async def test_a_finished_job_cannot_be_cancelled_and_an_unfinished_one_not_deleted(acme, db) -> None:
    finished = (await create(acme, spec())).json()["id"]
    finish(db, finished)
    running = (await create(acme, spec())).json()["id"]

    refused_cancel = await acme.post(f"/v1/jobs/{finished}/cancel")
    refused_delete = await acme.delete(f"/v1/jobs/{running}")

    assert refused_cancel.status_code == 409 and "SUCCESS" in refused_cancel.json()["detail"]
    assert refused_delete.status_code == 409 and refused_delete.json()["loc"] == ["path", "job_id"]


async def test_delete_removes_the_job_its_shards_checkpoints_and_ledger_but_not_its_records(acme, db) -> None:
    job_id = (await create(acme, spec())).json()["id"]
    db[SHARDS].insert_one({"_id": f"{job_id}:0000", "shard_key": f"{job_id}:0000", "job_id": job_id, "state": ShardState.SUCCEEDED})
    db[CHECKPOINTS].insert_one({"_id": f"{job_id}:0000/main", "shard_key": f"{job_id}:0000", "job_id": job_id, "cursor": 1})
    db[JOB_TALLIES].insert_one({"_id": f"{job_id}/0", "job_id": job_id, "bucket": 0, "entries": {"s0000": "SUCCEEDED|1|1|0|1|1"}})
    db["records"].insert_one({"_id": f"rec-{job_id}", "job_id": job_id})
    finish(db, job_id)

    assert (await acme.delete(f"/v1/jobs/{job_id}")).status_code == 204

    assert db[JOBS].count_documents({"_id": job_id}) == 0
    assert db[SHARDS].count_documents({"job_id": job_id}) == db[CHECKPOINTS].count_documents({"job_id": job_id}) == 0
    assert db[JOB_TALLIES].count_documents({"job_id": job_id}) == 0
    assert db["records"].count_documents({"job_id": job_id}) == 1
    assert (await acme.get(f"/v1/jobs/{job_id}")).status_code == 404


async def test_result_is_409_while_running_then_kept_for_the_ttl_then_410(acme, db, settings) -> None:
    fresh = (await create(acme, spec())).json()["id"]
    assert (await acme.get(f"/v1/jobs/{fresh}/result")).status_code == 409
    finish(db, fresh)
    stale = (await create(acme, spec())).json()["id"]
    finish(db, stale, finished_ago_s=settings.result_ttl_s + 5)

    kept = await acme.get(f"/v1/jobs/{fresh}/result")
    gone = await acme.get(f"/v1/jobs/{stale}/result")

    assert kept.status_code == 200 and kept.json()["result"] == {"records_done": 7} and kept.json()["expires_at"]
    assert gone.status_code == 410 and "expired" in gone.json()["detail"]


async def test_another_tenants_jobs_are_invisible(acme, globex, db) -> None:
    job_id = (await create(acme, spec())).json()["id"]

    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/task/status/{job_id}", f"/task/result/{job_id}"):
        assert (await globex.get(path)).status_code == 404, path
    assert (await globex.post(f"/v1/jobs/{job_id}/cancel")).status_code == 404
    assert (await globex.delete(f"/v1/jobs/{job_id}")).status_code == 404
    assert job_id not in [i["id"] for i in (await globex.get("/v1/jobs", params={"limit": 200})).json()["items"]]
    assert db[JOBS].find_one({"_id": job_id}).get("cancel_requested") is None


# --- /v1/schedules -------------------------------------------------------------------------------
async def test_schedule_lifecycle(acme, db, start_commands) -> None:
    created = await acme.post("/v1/schedules", json={"name": "every minute", "kind": "interval", "interval_s": 60, "job": spec()})
    assert created.status_code == 201, created.text
    schedule = created.json()
    assert schedule["state"] == "active" and schedule["total_runs"] == 0
    due = datetime.fromisoformat(schedule["next_run_at"])
    assert timedelta(seconds=55) < due - datetime.now(UTC) <= timedelta(seconds=60)

    changed = await acme.patch(schedule["url"], json={"kind": "cron", "cron": "0 3 * * *", "timezone": "Europe/Berlin"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["interval_s"] is None and changed.json()["cron"] == "0 3 * * *"
    assert datetime.fromisoformat(changed.json()["next_run_at"]).astimezone(ZoneInfo("Europe/Berlin")).hour == 3

    paused = (await acme.post(f"{schedule['url']}/pause")).json()
    assert paused["state"] == "paused" and db[SCHEDULES].count_documents({"_id": schedule["id"], "paused": True}) == 1
    assert (await acme.post(f"{schedule['url']}/resume")).json()["state"] == "active"

    triggered = await acme.post(f"{schedule['url']}/trigger")
    assert triggered.status_code == 202, triggered.text
    job = db[JOBS].find_one({"_id": triggered.json()["job_id"]})
    assert job["schedule_id"] == schedule["id"] and job["idempotency_key"].startswith(f"schedule:{schedule['id']}:manual:")
    assert StartJob.model_validate_json((await next_message(start_commands)).body).job_id == job["_id"]
    after = (await acme.get(schedule["url"])).json()
    assert (after["manual_runs"], after["total_runs"], after["last_job_id"]) == (1, 0, job["_id"])
    assert schedule["id"] in [s["id"] for s in (await acme.get("/v1/schedules")).json()["items"]]

    assert (await acme.delete(schedule["url"])).status_code == 204
    assert (await acme.get(schedule["url"])).status_code == 404
    assert db[JOBS].count_documents({"_id": job["_id"]}) == 1  # the jobs it fired stay


@pytest.mark.parametrize(
    "body, location",
    [
        ({"kind": "cron", "cron": "61 * * * *"}, ["body", "cron"]),
        ({"kind": "cron", "cron": "* * * * *", "timezone": "Nowhere/City"}, ["body", "timezone"]),
        ({"kind": "interval"}, ["body", "interval_s"]),
        ({"kind": "once", "at": "2001-01-01T00:00:00Z"}, ["body", "at"]),
        ({"kind": "interval", "interval_s": 5, "job": {"pipeline": "synthetic", "params": {"count": -1}}}, ["body", "job", "params", "count"]),
        ({"kind": "interval", "interval_s": 5, "job": {"pipeline": "ftp", "params": {}}}, ["body", "job", "pipeline"]),
    ],
)
async def test_an_invalid_schedule_is_422_naming_the_field(acme, db, body, location) -> None:
    before = db[SCHEDULES].count_documents({})

    response = await acme.post("/v1/schedules", json={"job": spec(), **body})

    assert response.status_code == 422, response.text
    assert location in [e["loc"] for e in response.json()["detail"]], response.text
    assert db[SCHEDULES].count_documents({}) == before


async def test_an_invalid_timing_change_is_422_and_changes_nothing(acme, db) -> None:
    schedule = (await acme.post("/v1/schedules", json={"kind": "interval", "interval_s": 30, "job": spec()})).json()

    response = await acme.patch(schedule["url"], json={"kind": "cron"})

    assert response.status_code == 422 and ["body", "cron"] in [e["loc"] for e in response.json()["detail"]]
    assert db[SCHEDULES].find_one({"_id": schedule["id"]})["interval_s"] == 30


async def test_another_tenants_schedules_are_invisible(acme, globex) -> None:
    schedule = (await acme.post("/v1/schedules", json={"kind": "interval", "interval_s": 30, "job": spec()})).json()

    for method, suffix in (("get", ""), ("patch", ""), ("post", "/pause"), ("post", "/resume"), ("post", "/trigger"), ("delete", "")):
        kwargs = {"json": {"name": "mine now"}} if method == "patch" else {}
        response = await getattr(globex, method)(f"{schedule['url']}{suffix}", **kwargs)
        assert response.status_code == 404, (method, suffix)
    assert schedule["id"] not in [s["id"] for s in (await globex.get("/v1/schedules")).json()["items"]]


# --- the OpenAPI document ------------------------------------------------------------------------
async def test_openapi_describes_auth_and_errors(make_client) -> None:
    document = (await make_client(None).get("/openapi.json")).json()

    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    create_job = document["paths"]["/v1/jobs"]["post"]
    assert {"401", "403", "409", "413", "422", "429"} <= set(create_job["responses"])
    assert create_job["security"] == [{"HTTPBearer": []}]
    assert "Retry-After" in create_job["responses"]["429"]["headers"]
    assert {"404", "410"} <= set(document["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"])
    for path in ("/v1/schedules/{schedule_id}/trigger", "/task/start", "/dlq/entries", "/v1/jobs/{job_id}/cancel"):
        operation = next(iter(document["paths"][path].values()))
        assert {"401", "403"} <= set(operation["responses"]), path
    assert "security" not in document["paths"]["/healthz"]["get"]


# --- the pipeline catalog (issue 13): what the workers announced, and jobs checked against it -----


async def test_the_catalog_lists_every_announced_pipeline_with_its_schema_and_space(acme) -> None:
    listed = (await acme.get("/v1/pipelines")).json()["items"]
    one = await acme.get("/v1/pipelines/mongo_range")

    by_name = {p["name"]: p for p in listed}
    assert {"synthetic", "mongo_range"} <= set(by_name)
    assert by_name["synthetic"]["params_schema"]["required"] == ["count"]
    assert [s["kind"] for s in by_name["mongo_range"]["space"]] == ["key_range", "time_range"]
    assert one.status_code == 200 and one.json() == by_name["mongo_range"]
    assert (await acme.get("/v1/pipelines/ftp_dump")).status_code == 404


async def test_a_job_keeps_the_pipeline_version_and_the_resolved_space(acme, db) -> None:
    window = {"collection": "src", "since": "2026-01-01T00:00:00Z", "until": "2026-01-01T01:00:00Z"}
    db.client[tenant_database(db.name, "acme")]["src"].insert_one({"_id": 1})  # the tenant's own source
    keys = (await create(acme, spec())).json()["id"]
    times = (await create(acme, spec(pipeline="mongo_range", params=window))).json()["id"]

    assert db[JOBS].find_one({"_id": keys})["space"] == {
        "kind": "key_range", "start_field": "start", "end_field": None, "count_field": "count", "start": 0, "end": 1000,
    }
    job = db[JOBS].find_one({"_id": times})
    assert (job["space"]["kind"], job["space"]["end"] - job["space"]["start"]) == ("time_range", 3_600_000)
    assert job["pipeline_version"] == "3"


async def test_an_unannounced_pipeline_is_a_422_listing_the_known_ones(acme, db) -> None:
    response = await create(acme, spec(pipeline="ftp_dump"))

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "pipeline"] and "mongo_range" in error["msg"] and "synthetic" in error["msg"]


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"count": 10, "record_size": 0}, ["body", "params", "record_size"]),
        ({"count": 10, "colour": "red"}, ["body", "params", "colour"]),
        ({"start": 3}, ["body", "params", "count"]),
    ],
)
async def test_params_the_announced_schema_refuses_are_a_422_naming_the_field(acme, db, params, loc) -> None:
    before = db[JOBS].count_documents({})

    response = await create(acme, spec(params=params))

    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [loc]
    assert db[JOBS].count_documents({}) == before


async def test_a_schedule_whose_job_the_catalog_refuses_is_a_422(acme) -> None:
    body = {"kind": "interval", "interval_s": 60, "job": {"pipeline": "synthetic", "params": {"count": 0}}}

    response = await acme.post("/v1/schedules", json=body)

    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "job", "params", "count"]]


# A `pipelines` document is written by whatever runs as a worker: a broken or hostile one is that
# pipeline not usable (422 naming `pipeline`, left out of the list), never a 500 for every caller.
BROKEN_ENTRIES = {
    "bad_json": {"params_schema_json": "{not json", "space": [{"kind": "single"}]},
    "no_schema": {"space": [{"kind": "single"}]},
    "bad_type": {"params_schema_json": '{"type": 5}', "space": [{"kind": "single"}]},
    "bad_regex": {"params_schema_json": '{"properties": {"a": {"type": "string", "pattern": "("}}}', "space": [{"kind": "single"}]},
    "remote_ref": {"params_schema_json": '{"$ref": "http://169.254.169.254/latest/meta-data"}', "space": [{"kind": "single"}]},
    "ref_loop": {"params_schema_json": '{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}', "space": [{"kind": "single"}]},
}


@pytest.fixture
def broken_catalog(db) -> Iterator[None]:
    from cairn_contracts.pipelines import PIPELINES

    db[PIPELINES].insert_many([{"_id": name, **document} for name, document in BROKEN_ENTRIES.items()])
    yield
    db[PIPELINES].delete_many({"_id": {"$in": list(BROKEN_ENTRIES)}})


async def test_a_broken_catalog_entry_is_never_a_500(acme, db, broken_catalog) -> None:
    listed = await acme.get("/v1/pipelines")

    assert listed.status_code == 200
    assert {"synthetic", "mongo_range"} <= {p["name"] for p in listed.json()["items"]}
    for name in BROKEN_ENTRIES:
        assert (await acme.get(f"/v1/pipelines/{name}")).status_code in (200, 404), name
        response = await create(acme, spec(pipeline=name, params={"a": "x"}))
        assert response.status_code == 422, (name, response.text)
        assert [e["loc"] for e in response.json()["detail"]] == [["body", "pipeline"]], name

