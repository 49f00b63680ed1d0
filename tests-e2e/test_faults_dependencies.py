"""Issue 11, items 10-13 (fault injection): the dependencies of the gateway go away and come back.

- Redis outage mid-job: a private redis-server on a free port, SIGKILLed and restarted;
- RabbitMQ down when the gateway starts: a private RabbitMQ node, started only later;
- MongoDB down: a private nx-27017 process, stopped and restarted.

The machine's shared servers are never touched; every server here runs on a free loopback port.
Nothing may be lost or doubled, and every job finishes within a bounded time after the fault ends.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient

from cairn_contracts.namespaces import PIPELINES
from cairn_testkit.catalog import seed_catalog
from cairn_testkit.servers import MongoStandIn, RabbitNode, RedisServer
from harness import System, build_system, dump


def ready(system: System) -> httpx.Response:
    return httpx.get(f"{system.base_url}/readyz", timeout=10)


def synthetic(count: int, collection: str, delay_ms: float = 0.0) -> dict:
    return {
        "pipeline": "synthetic",
        "params": {"count": count, "record_size": 16, "delay_ms_per_record": delay_ms},
        "sharding": {"strategy": "range", "shards": 2},
        "batch_size": 200,
        "target_collection": collection,
    }


def assert_stored_once(system: System, job_id: str, collection: str, total: int) -> None:
    """Nothing lost, nothing doubled: every record once, and the committed counts agree."""
    assert system.records(collection).count_documents({"job_id": job_id}) == total
    assert sum(c["records_done"] for c in system.db.checkpoints.find({"job_id": job_id})) == total




def test_redis_outage_mid_job_status_and_submissions_go_on(
    system_factory: Callable[..., System], private_redis: RedisServer
) -> None:
    system = system_factory("redis_outage", overrides={"CAIRN_REDIS_URL": private_redis.url})
    total = 2000
    job_id = system.start_job(synthetic(total, "redis_outage", delay_ms=2))
    system.wait_for(lambda: system.status(job_id)["records_done"] > 0, "the job to make progress", 60)

    private_redis.kill()
    with system.client() as client:
        during = client.get(f"/task/status/{job_id}")  # before the fix: 500
        second = client.post("/task/start", json=synthetic(500, "redis_outage_second"))
    not_ready = ready(system)
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)  # polls status all along
    second_final = system.wait_for_state(second.json()["task_id"], {"SUCCESS", "FAILURE"}, timeout_s=120)
    fallbacks = system.metrics_text("gateway")

    private_redis.start()  # same port: the gateway needs no restart
    system.wait_for(lambda: ready(system).status_code == 200, "readiness once Redis is back", 30)

    assert during.status_code == 200, during.text
    assert second.status_code == 202, second.text
    assert not_ready.status_code == 503
    assert not_ready.json()["dependencies"]["redis"]["status"] == "unavailable"
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    assert second_final["state"] == "SUCCESS", dump(second_final)
    assert_stored_once(system, job_id, "redis_outage", total)
    assert_stored_once(system, second.json()["task_id"], "redis_outage_second", 500)
    assert 'cairn_gateway_dependency_fallbacks_total{dependency="redis",use="status_cache"}' in fallbacks


@pytest.fixture
def stopped_broker() -> Iterator[RabbitNode]:
    """A private RabbitMQ node that is NOT running when the test starts (the test starts it)."""
    if os.geteuid() != 0:
        pytest.fail("starting a private RabbitMQ node needs root (the server runs as the rabbitmq user)")
    base_dir = Path(tempfile.mkdtemp(prefix="cairn-rabbit-"))  # the node runs as rabbitmq: not pytest's tmp
    node = RabbitNode(base_dir, f"cairn-e2e-down-{os.getpid()}")
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_gateway_started_while_the_broker_is_down_accepts_jobs_that_run_once_it_is_up(
    test_env, mongo_client: MongoClient, tmp_path: Path, stopped_broker: RabbitNode
) -> None:
    database = f"{test_env.mongodb_database}_broker_down"
    env = {**test_env.service_env(), "CAIRN_MONGODB_DATABASE": database, "CAIRN_AMQP_URL": stopped_broker.amqp_url}
    system = build_system(
        env, mongo_client[database], "/", stopped_broker.amqp_url, tmp_path, rabbit_node=stopped_broker.node,
        overrides={"CAIRN_BROKER_RETRY_MAX_S": "1"},
    )
    try:
        announced_earlier(system)
        system.start_services(["gateway"])  # before the fix: the gateway exited, never healthy
        not_ready = ready(system)
        early = system.start_job(synthetic(400, "broker_down"))
        recorded = system.db.jobs.find_one({"_id": early})

        stopped_broker.start()
        system.start_services(["scheduler", "ingest_worker", "dlq_handler"])
        system.wait_for(lambda: ready(system).status_code == 200, "the gateway to reach the broker", 60)
        later = system.start_job(synthetic(400, "broker_down_later"))
        early_final = system.wait_for_state(early, {"SUCCESS", "FAILURE"}, timeout_s=120)
        later_final = system.wait_for_state(later, {"SUCCESS", "FAILURE"}, timeout_s=120)

        assert not_ready.status_code == 503
        assert not_ready.json()["dependencies"]["rabbitmq"]["status"] == "unavailable"
        assert not_ready.json()["dependencies"]["mongodb"]["status"] == "ok"
        assert recorded["state"] == "PENDING" and recorded["command_published_at"] is None
        assert early_final["state"] == "SUCCESS", dump(early_final) + system.logs()  # relayed by the scheduler
        assert later_final["state"] == "SUCCESS", dump(later_final) + system.logs()
        assert_stored_once(system, early, "broker_down", 400)
        assert_stored_once(system, later, "broker_down_later", 400)
    finally:
        system.stop_services()
        mongo_client.drop_database(database)


def test_mongodb_down_answers_503_problem_and_recovers(test_env, tmp_path: Path) -> None:
    store = MongoStandIn(tmp_path / "nx-27017")
    store.start()
    client = MongoClient(store.uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    env = {**test_env.service_env(), "MONGODB_URI": store.uri, "CAIRN_MONGODB_DATABASE": "cairn_store_down"}
    system = build_system(env, client["cairn_store_down"], test_env.amqp_url.rsplit("/", 1)[-1], test_env.amqp_url, tmp_path)
    try:
        announced_earlier(system)
        system.start_services(["gateway"])
        job_id = system.start_job(synthetic(100, "store_down"))
        store.stop()
        with system.client() as api:
            answers = [
                api.get(f"/task/status/{job_id}"),
                api.post("/task/start", json=synthetic(100, "store_down")),
                api.get("/v1/jobs"),
            ]
        not_ready = ready(system)
        alive = httpx.get(f"{system.base_url}/healthz", timeout=10)

        store.start()  # same port and data
        with system.client() as api:
            again = api.get(f"/task/status/{job_id}")

        for answer in answers:  # before the fix: a plain-text 500
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert int(answer.headers["retry-after"]) > 0
            assert "MongoDB" in answer.json()["detail"]
        assert not_ready.status_code == 503 and not_ready.json()["dependencies"]["mongodb"]["status"] == "unavailable"
        assert alive.status_code == 200
        assert again.status_code == 200 and again.json()["task_id"] == job_id
    finally:
        system.stop_services()
        client.close()
        store.stop()


def announced_earlier(system: System) -> None:
    """The catalog as the workers of an earlier run left it: the gateway checks jobs against it,
    and these tests start the gateway before any worker."""
    if system.db[PIPELINES].count_documents({}) == 0:
        seed_catalog(system.db)
