"""The gateway's HTTP API, driven through ASGI with its lifespan run, against this run's MongoDB-wire
server, RabbitMQ vhost and Redis prefix."""

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from pymongo.database import Database

from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS
from cairn_contracts.topology import HEADER_CORRELATION_ID, QUEUE_SCHEDULER_COMMANDS
from cairn_gateway.admin import create_key
from cairn_gateway.app import create_app
from cairn_gateway.settings import GatewaySettings
from cairn_testkit.aio import drain, next_message

SPEC = {"pipeline": "synthetic", "params": {"count": 1000}, "sharding": {"shards": 4}, "priority": 3, "name": "nightly"}


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient
    db: Database
    settings: GatewaySettings


# The gateway's settings in this module (conftest.py `settings`).
GATEWAY_SETTINGS = {"job_lock_ttl_s": 0}  # these tests submit one spec many times; the lock has its own tests


def admin_token(db: Database, tenant: str = "default") -> str:
    """An API key of `tenant` (admin scope), as `cairn-gateway-admin create-key` makes one."""
    return create_key(db, tenant, ["admin"], "gateway tests")


async def running(app: FastAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10, headers=headers)


@pytest.fixture(scope="module")
async def gateway(app, db, settings) -> AsyncIterator[Gateway]:
    async with await running(app, admin_token(db)) as client:
        yield Gateway(app, client, db, settings)


@pytest.fixture
async def commands(broker):
    """The scheduler's command queue, empty at the start of the test."""
    queue = broker.queues[QUEUE_SCHEDULER_COMMANDS]
    await drain(queue)
    return queue


async def start(gateway: Gateway, body: dict, **headers: str) -> httpx.Response:
    return await gateway.client.post("/task/start", json=body, headers=headers)


async def test_start_records_the_job_and_publishes_its_command(gateway, commands) -> None:
    response = await start(gateway, SPEC)

    assert response.status_code == 202
    body = response.json()
    task_id = body["task_id"]
    assert body == {"task_id": task_id, "state": "PENDING", "status_url": f"/task/status/{task_id}", "created": True}
    assert response.headers["location"] == f"/task/status/{task_id}"
    job = gateway.db[JOBS].find_one({"_id": task_id})
    assert job["state"] == JobState.PENDING
    assert job["command_published_at"] is not None
    assert job["tenant"] == "default" and job["pipeline"] == "synthetic" and job["name"] == "nightly"
    assert job["spec"]["params"]["count"] == 1000
    message = await next_message(commands)
    command = StartJob.model_validate_json(message.body)
    assert command.job_id == task_id
    assert command.spec.sharding.shards == 4
    assert message.priority == 3
    assert message.headers[HEADER_CORRELATION_ID] == task_id


@pytest.mark.parametrize(
    "body, location",
    [
        ({"pipeline": "synthetic", "params": {"count": -1}}, ["body", "params", "count"]),
        ({"pipeline": "ftp_dump", "params": {"count": 1}}, ["body", "pipeline"]),
        ({"params": {"count": 1}}, ["body", "pipeline"]),
        ({"pipeline": "synthetic", "params": {"count": 1}, "sharding": {"strategy": "round_robin"}}, ["body", "sharding", "strategy"]),
        ({"pipeline": "synthetic", "params": {"count": 1}, "colour": "red"}, ["body", "colour"]),
        ({"pipeline": "mongo_range", "params": {"collection": "src", "start": 9, "end": 3}}, ["body", "params", "end"]),
    ],
    ids=["negative-count", "unknown-pipeline", "missing-pipeline", "unknown-strategy", "extra-field", "empty-range"],
)
async def test_invalid_body_is_422_naming_the_field_and_records_nothing(gateway, commands, body, location) -> None:
    jobs_before = gateway.db[JOBS].count_documents({})

    response = await start(gateway, body)

    assert response.status_code == 422
    assert location in [error["loc"] for error in response.json()["detail"]]
    assert gateway.db[JOBS].count_documents({}) == jobs_before
    assert await drain(commands) == []


async def test_same_idempotency_key_and_body_gives_the_same_job(gateway, commands) -> None:
    key = f"key-{uuid.uuid4().hex}"

    first = await start(gateway, SPEC, **{"Idempotency-Key": key})
    second = await start(gateway, SPEC, **{"Idempotency-Key": key})

    assert first.status_code == second.status_code == 202
    assert first.json()["task_id"] == second.json()["task_id"]
    assert (first.json()["created"], second.json()["created"]) == (True, False)
    assert gateway.db[JOBS].count_documents({"idempotency_key": key}) == 1
    assert len(await drain(commands)) == 1


async def test_same_idempotency_key_with_another_body_is_409(gateway, commands) -> None:
    key = f"key-{uuid.uuid4().hex}"
    first = await start(gateway, SPEC, **{"Idempotency-Key": key})

    conflict = await start(gateway, {**SPEC, "priority": 1}, **{"Idempotency-Key": key})

    assert conflict.status_code == 409
    assert key in conflict.json()["detail"] and first.json()["task_id"] in conflict.json()["detail"]
    assert gateway.db[JOBS].count_documents({"idempotency_key": key}) == 1


async def test_jobs_without_idempotency_key_are_separate_jobs(gateway, commands) -> None:
    first = await start(gateway, SPEC)
    second = await start(gateway, SPEC)

    assert first.status_code == second.status_code == 202
    assert first.json()["task_id"] != second.json()["task_id"]
    assert first.json()["created"] and second.json()["created"]
    assert gateway.db[JOBS].count_documents({"_id": {"$in": [first.json()["task_id"], second.json()["task_id"]]}}) == 2


async def test_status_of_an_unknown_job_is_404(gateway) -> None:
    response = await gateway.client.get("/task/status/nope")

    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


async def test_result_of_an_unknown_job_is_404(gateway) -> None:
    assert (await gateway.client.get("/task/result/nope")).status_code == 404


async def test_every_error_is_one_problem_body(gateway) -> None:
    # problems.py: RFC 9457 members, `loc` pointing at the request part; 422 keeps its field list.
    missing = await gateway.client.get("/task/status/nope")
    invalid = await gateway.client.post("/task/start", json={"pipeline": "nope"})
    no_route = await gateway.client.get("/no/such/route")

    assert missing.headers["content-type"] == invalid.headers["content-type"] == "application/problem+json"
    assert missing.json() == {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no job nope", "loc": ["path", "task_id"]}
    assert (invalid.json()["status"], invalid.json()["title"]) == (422, HTTPStatus(422).phrase)  # per Python: Entity or Content
    assert ["body", "pipeline"] in [error["loc"] for error in invalid.json()["detail"]]
    assert (no_route.status_code, no_route.json()["status"], no_route.headers["content-type"]) == (404, 404, "application/problem+json")


async def test_result_past_the_ttl_is_410_on_the_task_api_too(gateway) -> None:
    # One definition of expiry (JobService.result): the retention sweep's flag or the finish time.
    task_id = (await start(gateway, SPEC)).json()["task_id"]
    finished = datetime.fromtimestamp(0, UTC)  # long before any CAIRN_RESULT_TTL_S
    gateway.db[JOBS].update_one(
        {"_id": task_id},
        {"$set": {"state": JobState.SUCCESS, "result": {"records_done": 1}, "finished_at": finished, "finished_at_ms": 0}},
    )

    response = await gateway.client.get(f"/task/result/{task_id}")

    assert response.status_code == 410 and response.json()["loc"] == ["path", "task_id"]


async def test_status_of_a_new_job_is_pending(gateway) -> None:
    task_id = (await start(gateway, SPEC)).json()["task_id"]

    response = await gateway.client.get(f"/task/status/{task_id}")

    assert response.status_code == 200
    status = response.json()
    assert (status["task_id"], status["state"], status["progress"], status["records_done"]) == (task_id, "PENDING", 0.0, 0)
    assert status["pipeline"] == "synthetic" and status["priority"] == 3 and status["name"] == "nightly"
    assert status["shards"]["total"] == 0
    assert status["created_at"].endswith(("Z", "+00:00"))


async def test_result_while_pending_is_409(gateway) -> None:
    task_id = (await start(gateway, SPEC)).json()["task_id"]

    response = await gateway.client.get(f"/task/result/{task_id}")

    assert response.status_code == 409
    assert "PENDING" in response.json()["detail"]


async def test_result_of_a_finished_job_is_its_result(gateway) -> None:
    task_id = (await start(gateway, SPEC)).json()["task_id"]
    result = {"records_done": 1000, "records_written": 1000, "records_redone": 0, "batches": 4, "failed_shards": []}
    gateway.db[JOBS].update_one(
        {"_id": task_id}, {"$set": {"state": JobState.SUCCESS, "result": result, "finished_at": datetime.now(UTC)}}
    )

    response = await gateway.client.get(f"/task/result/{task_id}")

    assert response.status_code == 200
    body = response.json()
    assert (body["task_id"], body["state"], body["result"]) == (task_id, "SUCCESS", result)
    assert body["finished_at"] is not None


async def test_result_past_its_retention_is_410(gateway) -> None:
    task_id = (await start(gateway, SPEC)).json()["task_id"]
    gateway.db[JOBS].update_one(
        {"_id": task_id},
        {"$set": {"state": JobState.SUCCESS, "finished_at": datetime.now(UTC), "result_expired": True}, "$unset": {"result": ""}},
    )

    response = await gateway.client.get(f"/task/result/{task_id}")

    assert response.status_code == 410
    assert response.json()["loc"] == ["path", "task_id"]


async def test_status_of_a_finished_job_is_cached_in_redis(gateway) -> None:
    task_id = (await start(gateway, SPEC)).json()["task_id"]
    gateway.db[JOBS].update_one({"_id": task_id}, {"$set": {"state": JobState.FAILURE, "finished_at": datetime.now(UTC)}})
    cache = aioredis.Redis.from_url(gateway.settings.redis_url)
    try:
        first = await gateway.client.get(f"/task/status/{task_id}")
        key = f"{gateway.settings.redis_prefix}:status:default:{task_id}"
        assert await cache.exists(key) == 1
        # the cached answer is served even when the store says something else now
        gateway.db[JOBS].update_one({"_id": task_id}, {"$set": {"name": "changed"}})
        second = await gateway.client.get(f"/task/status/{task_id}")
    finally:
        await cache.delete(f"{gateway.settings.redis_prefix}:status:default:{task_id}")
        await cache.aclose()

    assert first.status_code == second.status_code == 200
    assert first.json()["state"] == "FAILURE"
    assert second.json() == first.json()


async def test_openapi_lists_the_task_paths(gateway) -> None:
    response = await gateway.client.get("/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/task/start", "/task/status/{task_id}", "/task/result/{task_id}"} <= set(paths)
    assert "post" in paths["/task/start"] and "get" in paths["/task/result/{task_id}"]


async def test_healthz_pings_mongodb(gateway) -> None:
    response = await gateway.client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_a_job_whose_command_is_not_confirmed_is_still_accepted_and_left_for_the_relay(settings, db, commands) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app), await running(app, admin_token(db)) as client:
        await app.state.jobs.publisher.close()  # the broker channel is gone: no confirm possible

        response = await client.post("/task/start", json=SPEC)

    assert response.status_code == 202
    job = db[JOBS].find_one({"_id": response.json()["task_id"]})
    assert job["state"] == JobState.PENDING
    assert job["command_published_at"] is None
    assert await drain(commands) == []
