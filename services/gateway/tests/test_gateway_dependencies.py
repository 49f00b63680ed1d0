"""The gateway with a dependency down, hung or saturated (issue 11, items 10-13), driven through
ASGI with its lifespan run. Redis "down" is a loopback port nobody listens on and "hung" one that
accepts connections and never answers; MongoDB "down" is a private nx-27017 process that is stopped;
RabbitMQ "down" is a loopback port with no broker, later forwarded to the machine's broker. The
machine's shared servers are never stopped."""

import asyncio
import contextlib
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pymongo import MongoClient
from pymongo.database import Database

from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS
from cairn_gateway.admin import create_key
from cairn_gateway.app import create_app
from cairn_gateway.auth import new_key
from cairn_gateway.settings import GatewaySettings
from cairn_testkit.aio import drain, next_message
from cairn_testkit.catalog import seed_catalog
from cairn_testkit.servers import MongoStandIn, free_port

SPEC = {"pipeline": "synthetic", "params": {"count": 100}, "sharding": {"shards": 2}}


def spec(name: str | None = None) -> dict:
    return {**SPEC, "name": name or f"job {uuid.uuid4().hex[:10]}"}


@pytest.fixture
def database(mongo_client, test_env) -> Iterator[str]:
    name = f"{test_env.mongodb_database}_gwdep_{uuid.uuid4().hex[:6]}"
    seed_catalog(mongo_client[name])  # as a worker announces it: jobs are checked against it
    yield name
    mongo_client.drop_database(name)


def settings_for(test_env, database: str, **changes) -> GatewaySettings:
    options = {
        "mongodb_uri": test_env.mongodb_uri,
        "mongodb_database": database,
        "amqp_url": test_env.amqp_url,
        "redis_url": test_env.redis_url,
        "redis_prefix": f"{test_env.redis_prefix}-gwdep",
        **changes,
    }
    return GatewaySettings(**options)


def client_of(app: FastAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60, headers=headers)


@contextlib.asynccontextmanager
async def gateway(settings: GatewaySettings, db: Database) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    seed_catalog(db)  # as a worker announces it: jobs are checked against it
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with client_of(app, create_key(db, "default", ["admin"], "dependency tests")) as client:
            yield app, client


def fallbacks(use: str) -> float:
    return REGISTRY.get_sample_value("cairn_gateway_dependency_fallbacks_total", {"dependency": "redis", "use": use}) or 0.0


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there


@contextlib.contextmanager
def hung_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@contextlib.asynccontextmanager
async def forwarder(listen_port: int, target: tuple[str, int], delay_s: float = 0.0) -> AsyncIterator[None]:
    """A TCP forwarder from 127.0.0.1:`listen_port` to the real server at `target`, delaying each
    chunk by `delay_s`: a slow link, or "the server comes back" on a port where none was."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(data)
                await writer.drain()
        writer.close()

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        writers.extend((writer, upstream_writer))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        yield
        for writer in writers:  # the link goes away with the forwarder
            writer.close()


# --- item 11: Redis saturated -------------------------------------------------------------------


async def test_200_concurrent_identical_submits_without_a_key_make_one_job(test_env, database, mongo_client, broker) -> None:
    """A burst larger than the Redis pool waits for a connection; a busy Redis is not "Redis down"
    (which skips the job lock and let identical jobs through: 12-33 of 200 before the fix). Redis
    is reached through a forwarder adding 20 ms each way, so that every call holds its connection
    long enough for the burst to need more connections than the pool has."""
    db: Database = mongo_client[database]
    redis = urlsplit(test_env.redis_url)
    port = free_port()
    settings = settings_for(
        test_env, database, redis_url=urlunsplit(redis._replace(netloc=f"127.0.0.1:{port}")), mongodb_operation_timeout_ms=120_000
    )  # one job is the point here, not how fast the stand-in answers 200 requests at once
    async with forwarder(port, (redis.hostname, redis.port or 6379), delay_s=0.02), gateway(settings, db) as (_, client):
        answers = await asyncio.gather(*(client.post("/task/start", json=spec("same")) for _ in range(200)))

    assert Counter(a.status_code for a in answers) == {202: 1, 409: 199}
    assert db[JOBS].count_documents({}) == 1


async def test_200_concurrent_submits_with_one_idempotency_key_make_one_job_even_without_redis(
    test_env, database, mongo_client, broker
) -> None:
    """One job per Idempotency-Key is MongoDB's guarantee (unique index, id derived from the key),
    whatever Redis does."""
    db: Database = mongo_client[database]
    for redis_url in (test_env.redis_url, dead_redis_url()):
        # 200 requests at once on the single-threaded stand-in, on a machine other runs share,
        # may wait past the 5 s per-operation budget (a 503 then, rightly): this test is about
        # one job per key, so it gives the store all the time it needs.
        settings = settings_for(test_env, database, redis_url=redis_url, mongodb_operation_timeout_ms=120_000)
        async with gateway(settings, db) as (_, client):
            key = uuid.uuid4().hex
            answers = await asyncio.gather(
                *(client.post("/task/start", json=spec("keyed"), headers={"Idempotency-Key": key}) for _ in range(200))
            )
        assert {a.status_code for a in answers} == {202}
        assert len({a.json()["task_id"] for a in answers}) == 1
        assert sum(a.json()["created"] for a in answers) == 1
        assert db[JOBS].count_documents({"idempotency_key": key}) == 1


# --- item 10: Redis down or hung ----------------------------------------------------------------


async def test_with_redis_down_status_answers_from_mongodb_and_fallbacks_are_counted(
    test_env, database, mongo_client, broker, caplog
) -> None:
    db: Database = mongo_client[database]
    settings = settings_for(test_env, database, redis_url=dead_redis_url())
    before = {use: fallbacks(use) for use in ("status_cache", "rate_limit", "job_lock")}
    caplog.set_level("WARNING", logger="cairn_gateway.degraded")
    async with gateway(settings, db) as (_, client):
        started = await client.post("/task/start", json=spec())
        assert started.status_code == 202, started.text
        job_id = started.json()["task_id"]
        running = [await client.get(f"/task/status/{job_id}") for _ in range(10)]
        db[JOBS].update_one({"_id": job_id}, {"$set": {"state": JobState.SUCCESS}})
        finished = await client.get(f"/task/status/{job_id}")

    assert [r.status_code for r in running] == [200] * 10
    assert running[0].json()["state"] == "PENDING"
    assert finished.status_code == 200 and finished.json()["state"] == "SUCCESS"
    assert fallbacks("status_cache") - before["status_cache"] >= 12  # 11 reads + the write of the finished one
    assert fallbacks("rate_limit") - before["rate_limit"] >= 12
    assert fallbacks("job_lock") - before["job_lock"] >= 1
    # Logged sparingly: at most one line per use, not one per request.
    lines = Counter(r.args[3] for r in caplog.records if r.name == "cairn_gateway.degraded")  # by consequence (use)
    assert all(count <= 1 for count in lines.values()), lines


async def test_with_redis_down_the_rate_limit_lets_requests_through(test_env, database, mongo_client, broker) -> None:
    """Deliberate: the limit protects capacity, it is not a security boundary (README)."""
    db: Database = mongo_client[database]
    document, token = new_key("default", ["read"], "limited", rate_limit_per_minute=1)
    db["api_keys"].insert_one(document)
    app = create_app(settings_for(test_env, database, redis_url=dead_redis_url()))
    async with app.router.lifespan_context(app), client_of(app, token) as client:
        answers = [await client.get("/task/status/none") for _ in range(3)]

    assert [a.status_code for a in answers] == [404, 404, 404]


async def test_a_hung_redis_does_not_hang_requests(test_env, database, mongo_client, broker) -> None:
    db: Database = mongo_client[database]
    with hung_redis() as redis_url:
        async with gateway(settings_for(test_env, database, redis_url=redis_url, redis_timeout_s=0.5), db) as (_, client):
            started = await asyncio.wait_for(client.post("/task/start", json=spec()), 60)
            status = await asyncio.wait_for(client.get(f"/task/status/{started.json()['task_id']}"), 60)

    assert started.status_code == 202
    assert status.status_code == 200 and status.json()["state"] == "PENDING"


# --- item 12: MongoDB down ----------------------------------------------------------------------


async def test_with_mongodb_down_requests_answer_503_problem_naming_the_store(
    test_env, private_mongo: MongoStandIn, broker
) -> None:
    store = MongoClient(private_mongo.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    db = store["cairn_down"]
    settings = settings_for(test_env, "cairn_down", mongodb_uri=private_mongo.uri)
    other_token = create_key(db, "default", ["read"], "not yet looked up")
    try:
        async with gateway(settings, db) as (app, client):
            assert app.state.mongo.options.server_selection_timeout == 2.0  # CAIRN_MONGODB_SERVER_SELECTION_TIMEOUT_MS
            job_id = (await client.post("/task/start", json=spec())).json()["task_id"]
            private_mongo.stop()

            answers = [
                await client.get(f"/task/status/{job_id}"),
                await client.post("/task/start", json=spec()),
                await client.get("/v1/jobs"),
            ]
            async with client_of(app, other_token) as stranger:  # its key must be looked up: 503, not 401
                answers.append(await stranger.get(f"/task/status/{job_id}"))
            ready = await client.get("/readyz")

            private_mongo.start()  # same port and data: the gateway recovers without a restart
            again = await client.get(f"/task/status/{job_id}")
    finally:
        store.close()

    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"].isdigit()
        assert "MongoDB" in answer.json()["detail"]
    assert ready.status_code == 503
    assert ready.json()["dependencies"]["mongodb"]["status"] == "unavailable"
    assert again.status_code == 200 and again.json()["task_id"] == job_id


async def test_a_stalled_mongodb_answers_503_within_the_operation_timeout(test_env, private_mongo: MongoStandIn, broker) -> None:
    # A server that accepts connections but stops answering (SIGSTOP): before the operation
    # timeout a request waited for the 60 s socket timeout. The bound below is generous.
    store = MongoClient(private_mongo.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    db = store["cairn_stalled"]
    settings = settings_for(test_env, "cairn_stalled", mongodb_uri=private_mongo.uri, mongodb_operation_timeout_ms=1000)
    try:
        async with gateway(settings, db) as (_, client):
            job_id = (await client.post("/task/start", json=spec())).json()["task_id"]
            assert private_mongo.process is not None
            private_mongo.process.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                answer = await client.get(f"/task/status/{job_id}")
                waited_s = time.monotonic() - started
            finally:
                private_mongo.process.send_signal(signal.SIGCONT)
            again = await client.get(f"/task/status/{job_id}")
    finally:
        store.close()

    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json" and "MongoDB" in answer.json()["detail"]
    assert waited_s < 30, waited_s
    assert again.status_code == 200


# --- item 13: RabbitMQ down at start; readiness -------------------------------------------------


async def test_readyz_names_each_dependency_and_healthz_is_liveness(test_env, database, mongo_client, broker) -> None:
    db: Database = mongo_client[database]
    async with gateway(settings_for(test_env, database), db) as (_, client):
        ready = await client.get("/readyz")
    async with gateway(settings_for(test_env, database, redis_url=dead_redis_url()), db) as (_, client):
        no_redis = await client.get("/readyz")
        alive = await client.get("/healthz")

    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "dependencies": {name: {"status": "ok"} for name in ("mongodb", "rabbitmq", "redis")},
    }
    assert no_redis.status_code == 503
    assert no_redis.json()["dependencies"]["redis"]["status"] == "unavailable"
    assert no_redis.json()["dependencies"]["mongodb"] == {"status": "ok"}
    assert alive.status_code == 200 and alive.json() == {"status": "ok"}


async def test_the_gateway_starts_without_the_broker_accepts_jobs_and_connects_when_it_comes(
    test_env, database, mongo_client, broker
) -> None:
    db: Database = mongo_client[database]
    commands = broker.queues[QUEUE_SCHEDULER_COMMANDS]
    await drain(commands)
    real = urlsplit(test_env.amqp_url)
    port = free_port()
    away = urlunsplit(real._replace(netloc=f"{real.username}:{real.password}@127.0.0.1:{port}"))
    settings = settings_for(test_env, database, amqp_url=away, broker_retry_max_s=0.5)

    async with gateway(settings, db) as (_, client):  # before the fix: the start itself failed
        alive = await client.get("/healthz")
        not_ready = await client.get("/readyz")
        accepted = await client.post("/task/start", json=spec())
        job = db[JOBS].find_one({"_id": accepted.json()["task_id"]})

        async with forwarder(port, (real.hostname, real.port or 5672)):
            for _ in range(300):  # up to 30 s: the background reconnect backs off 0.5 s at most
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            ready = await client.get("/readyz")
            published = await client.post("/task/start", json=spec())
            message = await next_message(commands)

    assert alive.status_code == 200
    assert not_ready.status_code == 503
    assert not_ready.json()["dependencies"]["rabbitmq"]["status"] == "unavailable"
    assert not_ready.json()["dependencies"]["mongodb"] == {"status": "ok"}
    assert accepted.status_code == 202
    assert job["state"] == JobState.PENDING and job["command_published_at"] is None  # left for the relay
    assert ready.status_code == 200, ready.text
    assert published.status_code == 202
    assert message.correlation_id == published.json()["task_id"]
    assert db[JOBS].find_one({"_id": published.json()["task_id"]})["command_published_at"] is not None
