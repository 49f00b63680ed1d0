"""Issue 16, worker control through ASGI against this run's MongoDB-wire server, RabbitMQ vhost
and Redis: the fenced shard transitions of terminate and revoke, and the operator scope. No
worker runs here, so remote control gets no reply (the e2e suite drives real workers)."""

import uuid
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.database import Database

from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, SHARDS, checkpoint_id
from cairn_gateway.errors import Conflict
from cairn_gateway.workers import WorkerControl

GATEWAY_SETTINGS = {"worker_control_timeout_s": 0.5}  # conftest.py `settings`: no worker answers here


@pytest.fixture
def client_with(client_for) -> Callable[..., httpx.AsyncClient]:
    return lambda *scopes: client_for("acme", scopes)


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
        {"_id": checkpoint_id(key), "shard_key": key, "sub_key": "main", "job_id": job_id, "fencing_token": token if checkpoint_token is None else checkpoint_token,
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
    assert db[CHECKPOINTS].update_one({"_id": checkpoint_id(key), "fencing_token": 3}, {"$inc": {"records_done": 5}}).matched_count == 0
    assert db[CHECKPOINTS].find_one({"_id": checkpoint_id(key)})["records_done"] == 5


async def test_terminate_of_a_bundles_first_claim_fences_its_checkpoint_still_as_planned(client_with, db) -> None:
    # A bundle's first claim of a shard (token 1) adopts its checkpoint (token 0, as planned) only
    # with its first commit: terminate fences it all the same.
    operator = client_with("operator")
    key = running_shard(db, token=1, checkpoint_token=0)
    response = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "ready"})
    assert response.status_code == 200, response.text
    assert db[CHECKPOINTS].find_one({"_id": checkpoint_id(key)})["fencing_token"] == 2
    # That claim's commit (conditional on a token older than its own 1) no longer matches.
    assert db[CHECKPOINTS].update_one({"_id": checkpoint_id(key), "fencing_token": {"$lt": 1}}, {"$set": {"done": True}}).matched_count == 0


class _MovesTheShardAfterTheFence:
    """The checkpoints collection, but the shard moves (the reaper re-queues it) right after
    terminate fences the checkpoint: the interleaving that makes terminate undo its fence."""

    def __init__(self, checkpoints: Any, move: Callable[[], None]) -> None:
        self._checkpoints, self._move = checkpoints, move

    async def find_one_and_update(self, *args: Any, **kwargs: Any) -> Any:
        fenced = await self._checkpoints.find_one_and_update(*args, **kwargs)
        self._move()
        return fenced

    def __getattr__(self, name: str) -> Any:
        return getattr(self._checkpoints, name)


async def test_terminate_that_finds_the_shard_moved_restores_the_checkpoints_token_exactly(db, test_env) -> None:
    # A bundle's first claim (token 1) whose checkpoint is still as planned (token 0).
    key = running_shard(db, token=1, checkpoint_token=0)
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, tz_aware=True)
    try:
        real = client[db.name]
        moved = _MovesTheShardAfterTheFence(
            real[CHECKPOINTS], lambda: db[SHARDS].update_one({"_id": key}, {"$set": {"state": ShardState.QUEUED}})
        )
        control = WorkerControl(app=None, db=cast(Any, {SHARDS: real[SHARDS], CHECKPOINTS: moved}), publisher=None)  # type: ignore[arg-type]
        with pytest.raises(Conflict):
            await control.terminate_shard(key, "ready", "alice")
    finally:
        await client.close()
    checkpoint = db[CHECKPOINTS].find_one({"_id": checkpoint_id(key)})
    assert checkpoint["fencing_token"] == 0 and "fenced_by" not in checkpoint  # as it was, not the run's token


async def test_terminate_of_a_shard_a_bundle_claimed_and_has_not_started_is_fenced_not_interrupted(client_with, db) -> None:
    # A bundle (RunShards) claims its shards together and runs them in turn: the pool process
    # holding this one runs another shard now, which an interrupt would stop instead.
    operator = client_with("operator")
    key = running_shard(db, bundle_claim="c0ffee", attempts=0)
    response = await operator.post(f"/v1/shards/{key}/terminate", json={"then": "ready"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["interrupted"] is False and "bundle" in answer["reply"] and answer["fencing_token"] == 4, answer
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == "RETRY" and int(shard["attempts"]) == 0  # no attempt was counted: none is given back


async def test_revoke_of_a_shard_a_bundle_claimed_and_has_not_started_cancels_it_and_moves_its_token(client_with, db) -> None:
    operator = client_with("operator")
    key = running_shard(db, bundle_claim="c0ffee", attempts=0)
    response = await operator.post(f"/v1/shards/{key}/revoke")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED", response.text
    shard = db[SHARDS].find_one({"_id": key})
    # The bundle's start of it (conditional on token 3) is refused from now on.
    assert shard["state"] == "CANCELLED" and int(shard["fencing_token"]) == 4 and shard["taken_by"] is None
    started = running_shard(db)  # a run that has started is terminated, not revoked
    assert (await operator.post(f"/v1/shards/{started}/revoke")).status_code == 409


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


async def test_a_tenant_admin_is_no_cluster_operator_and_cannot_mint_one(client_with, db) -> None:
    """Workers and shards are shared by every tenant: a tenant's `admin` key (one tenant's keys and
    dead letters) must neither control them nor create itself an `operator` key over HTTP."""
    admin = client_with("admin")
    key = running_shard(db)
    assert (await admin.get("/v1/workers")).status_code == 403
    assert (await admin.post(f"/v1/shards/{key}/terminate", json={"then": "cancelled"})).status_code == 403
    assert (await admin.post(f"/v1/shards/{key}/revoke")).status_code == 403
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.RUNNING
    for scopes in (["operator"], ["read", " operator"]):
        minted = await admin.post("/v1/keys", json={"scopes": scopes, "name": "escalate"})
        assert minted.status_code == 403, minted.text
    assert (await admin.post("/v1/keys", json={"scopes": ["read"], "name": "fine"})).status_code == 201
    # An operator key (made by the command line) may create another.
    operator = client_with("operator", "admin")
    assert (await operator.post("/v1/keys", json={"scopes": ["operator"], "name": "second operator"})).status_code == 201
    # The CLI sends a node name as one encoded path segment (cairn-ingest%40host): it is decoded.
    assert (await operator.get("/v1/workers/cairn-ingest%40nobody/inspect/active")).status_code == 404


async def test_broker_down_worker_control_answers_503_without_starving_the_default_executor() -> None:
    """A control call's thread can outlive its 503 by a few reconnect attempts. Those threads
    must not fill asyncio's default executor, which the gateway's DNS resolution (pymongo,
    aio-pika) also needs."""
    import asyncio
    import time

    from cairn_gateway.errors import NotConfirmed
    from cairn_gateway.workers import WorkerControl
    from cairn_runtime.celery_config import control_app

    control = WorkerControl(app=control_app("amqp://guest:guest@127.0.0.1:1//", "broker-down-test"), db=None, publisher=None, timeout_s=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    answers = await asyncio.gather(*(control.inspect("cairn-ingest@x", "active") for _ in range(12)), return_exceptions=True)
    assert all(isinstance(answer, NotConfirmed) for answer in answers), answers
    assert time.monotonic() - started < 30
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, lambda: None), timeout=5)


async def test_terminate_with_the_broker_down_still_answers_what_it_did(app, db) -> None:
    """The shard is stopped in MongoDB (fenced, CANCELLED) before the worker is asked to interrupt
    it: with RabbitMQ away that request fails, and the answer must say so (interrupted: false),
    not 503 as if nothing had been done (a retry would then get a 409)."""
    from cairn_gateway.workers import WorkerControl
    from cairn_runtime.celery_config import control_app

    wired = app.state.workers
    control = WorkerControl(app=control_app("amqp://guest:guest@127.0.0.1:1//", "broker-down-test"), db=wired.db, publisher=wired.publisher, timeout_s=0.3)
    key = running_shard(db)
    answer = await control.terminate_shard(key, "cancelled", "alice")
    assert (answer["state"], answer["interrupted"]) == ("CANCELLED", False), answer
    assert db[SHARDS].find_one({"_id": key})["state"] == ShardState.CANCELLED


async def test_terminate_without_a_body_takes_the_documented_default(client_with, db) -> None:
    """`then` defaults to ready (README): a bare POST is that, not a 422 for a missing body."""
    operator = client_with("operator")
    key = running_shard(db)
    response = await operator.post(f"/v1/shards/{key}/terminate")
    assert response.status_code == 200 and response.json()["state"] == "RETRY", response.text
