"""Issue 16, worker control through ASGI against this run's MongoDB-wire server, RabbitMQ vhost
and Redis: the fenced shard transitions of terminate and revoke, and the operator scope. No
worker runs here, so remote control gets no reply (the e2e suite drives real workers)."""

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from pymongo.database import Database

from cairn_contracts.states import ShardState
from cairn_contracts.store import API_KEYS, CHECKPOINTS, SHARDS
from cairn_gateway.app import create_app
from cairn_gateway.auth import new_key
from cairn_gateway.settings import GatewaySettings
from cairn_testkit.catalog import seed_catalog


@pytest.fixture(scope="module")
def database(mongo_client, test_env) -> str:
    name = f"{test_env.mongodb_database}_gwworkers_{uuid.uuid4().hex[:6]}"
    seed_catalog(mongo_client[name])  # as a worker announces it: jobs are checked against it
    yield name
    mongo_client.drop_database(name)


@pytest.fixture(scope="module")
async def app(test_env, database):
    settings = GatewaySettings(
        mongodb_uri=test_env.mongodb_uri, mongodb_database=database, amqp_url=test_env.amqp_url,
        redis_url=test_env.redis_url, redis_prefix=f"{test_env.redis_prefix}-gwworkers", worker_control_timeout_s=0.5,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def db(mongo_client, database) -> Database:
    return mongo_client[database]


@pytest.fixture
async def client_with(app, db) -> AsyncIterator:
    made: list[httpx.AsyncClient] = []

    def make(*scopes: str) -> httpx.AsyncClient:
        document, token = new_key("acme", scopes, "workers test key")
        db[API_KEYS].insert_one(document)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers={"Authorization": f"Bearer {token}"}, timeout=20
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def running_shard(db: Database, *, token: int = 3, checkpoint_token: int | None = None, **fields) -> str:
    """A RUNNING shard held by `worker-x/4242` under `token`, and its checkpoint."""
    job_id = uuid.uuid4().hex
    key = f"{job_id}:0000"
    db[SHARDS].insert_one(
        {
            "_id": key, "shard_key": key, "job_id": job_id, "index": 0, "strategy": "range", "range_start": 0, "range_end": 10,
            "state": ShardState.RUNNING, "fencing_token": token, "attempts": 2, "taken_by": "worker-x/4242", "lease_until": 2**40,
            "priority": 2, **fields,
        }
    )
    db[CHECKPOINTS].insert_one(
        {"_id": f"{key}:main", "shard_key": key, "sub_key": "main", "job_id": job_id, "fencing_token": checkpoint_token or token,
         "cursor": 5, "records_done": 5}
    )
    return key


async def test_terminate_fences_the_checkpoint_and_the_shard_and_gives_the_attempt_back(client_with, db) -> None:
    operator = client_with("operator")
    key = running_shard(db)
    response = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "ready"}, headers={"X-Cairn-Actor": "alice"})
    assert response.status_code == 200, response.text
    answer = response.json()
    # No worker answers here: the run is left to stop at its next (refused) write.
    assert answer["state"] == "RETRY" and answer["fencing_token"] == 4 and answer["interrupted"] is False, answer
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == "RETRY" and int(shard["fencing_token"]) == 4 and int(shard["attempts"]) == 1
    assert shard["taken_by"] is None and shard["lease_until"] is None and shard["terminated_by"] == "alice"
    assert isinstance(shard["next_retry_at_ms"], int)
    # The old run's commit (conditional on its token 3) no longer matches its checkpoint.
    assert db[CHECKPOINTS].update_one({"_id": f"{key}:main", "fencing_token": 3}, {"$inc": {"records_done": 5}}).matched_count == 0
    assert db[CHECKPOINTS].find_one({"_id": f"{key}:main"})["records_done"] == 5


async def test_terminate_as_cancelled_and_a_cancelled_jobs_shard_always_ends_cancelled(client_with, db) -> None:
    operator = client_with("operator")
    key = running_shard(db)
    response = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "cancelled"})
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED", response.text
    assert db[SHARDS].find_one({"_id": key})["state"] == "CANCELLED"
    marked = running_shard(db, cancel_requested=True)
    response = await operator.post(f"/v1/shards/{marked}/terminate", json={"then": "ready"})
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED", response.text


async def test_terminate_refuses_what_it_cannot_stop_and_changes_nothing(client_with, db) -> None:
    operator = client_with("operator")
    # Taken over meanwhile: the checkpoint already holds a newer token than the shard read.
    key = running_shard(db, token=3, checkpoint_token=4)
    response = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "ready"})
    assert response.status_code == 409, response.text
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == "RUNNING" and int(shard["fencing_token"]) == 3
    assert (await operator.post("/v1/shards/nope:0000/terminate", json={"then": "ready"})).status_code == 404
    bad = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "soon"})
    assert bad.status_code == 422 and "then" in str(bad.json()["detail"][0]["loc"])


async def test_revoke_cancels_only_a_shard_not_started(client_with, db) -> None:
    operator = client_with("operator")
    key = running_shard(db)
    db[SHARDS].update_one({"_id": key}, {"$set": {"state": ShardState.QUEUED, "taken_by": None}})
    refused = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "ready"})
    assert refused.status_code == 409 and "revoke" in refused.json()["detail"]
    response = await operator.post(f"/v1/shards/{key}/revoke")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED", response.text
    assert db[SHARDS].find_one({"_id": key})["state"] == "CANCELLED"
    assert (await operator.post(f"/v1/shards/{key}/revoke")).status_code == 409


async def test_worker_routes_need_the_operator_scope_and_answer_without_workers(client_with) -> None:
    reader = client_with("submit", "read")
    assert (await reader.get("/v1/workers")).status_code == 403
    assert (await reader.post("/v1/shards/x:0000/terminate", json={"then": "ready"})).status_code == 403
    operator = client_with("operator")
    listed = await operator.get("/v1/workers")
    assert listed.status_code == 200 and listed.json() == []
    assert (await operator.get("/v1/workers/cairn-ingest@nobody/inspect/active")).status_code == 404
    assert (await operator.post("/v1/workers/cairn-ingest@nobody/pool/grow", json={"n": 1})).status_code == 404
    assert (await operator.post("/v1/workers/cairn-ingest@nobody/shutdown")).status_code == 404
    assert (await operator.get("/v1/workers/bad%20name/inspect/active")).status_code == 422
