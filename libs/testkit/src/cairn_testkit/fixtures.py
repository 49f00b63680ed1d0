"""Session fixtures for every Cairn test suite (loaded by the root conftest.py).

One run = one id: its MongoDB database, RabbitMQ vhost and Redis key prefix all carry it, so runs
sharing the machine's services never see each other, and each removes what it made.
"""

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from pymongo import MongoClient

from cairn_testkit.servers import MongoStandIn, RedisServer, delete_redis_prefix, rabbitmq_vhost

AMQP_HOST = os.environ.get("CAIRN_TEST_AMQP_HOST", "127.0.0.1:5672")
REDIS_URL = os.environ.get("CAIRN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class TestEnvironment:
    __test__ = False  # not a test class, whatever pytest's name rule says

    run_id: str
    mongodb_uri: str
    mongodb_database: str
    amqp_url: str
    redis_url: str
    redis_prefix: str
    mongo_stand_in: MongoStandIn | None

    def service_env(self) -> dict[str, str]:
        """Environment variables that point a Cairn service at this run's isolated resources."""
        return {
            "MONGODB_URI": self.mongodb_uri,
            "CAIRN_MONGODB_DATABASE": self.mongodb_database,
            "CAIRN_AMQP_URL": self.amqp_url,
            "CAIRN_REDIS_URL": self.redis_url,
            "CAIRN_REDIS_PREFIX": self.redis_prefix,
        }


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def mongo_stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoStandIn | None]:
    if os.environ.get("MONGODB_URI"):
        yield None
        return
    server = MongoStandIn(Path(tmp_path_factory.mktemp("nx-27017")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def test_env(run_id: str, mongo_stand_in: MongoStandIn | None) -> Iterator[TestEnvironment]:
    mongodb_uri = os.environ.get("MONGODB_URI") or mongo_stand_in.uri  # type: ignore[union-attr]
    database = f"cairn_test_{run_id}"
    vhost = f"cairn-test-{run_id}"
    redis_prefix = f"cairn-test-{run_id}"
    with rabbitmq_vhost(vhost):
        yield TestEnvironment(
            run_id=run_id,
            mongodb_uri=mongodb_uri,
            mongodb_database=database,
            amqp_url=f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}",
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            mongo_stand_in=mongo_stand_in,
        )
        client: MongoClient = MongoClient(mongodb_uri, serverSelectionTimeoutMS=5000)
        try:
            client.drop_database(database)
        finally:
            client.close()
        delete_redis_prefix(REDIS_URL, redis_prefix)


@pytest.fixture(scope="session")
def mongo_client(test_env: TestEnvironment) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(test_env.mongodb_uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def mongo_db(mongo_client: MongoClient, test_env: TestEnvironment, request: pytest.FixtureRequest):
    """A database of its own for one test, dropped afterwards."""
    name = f"{test_env.mongodb_database}_{uuid.uuid4().hex[:6]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@pytest.fixture
def private_mongo(tmp_path: Path) -> Iterator[MongoStandIn]:
    """A MongoDB-wire server of one test's own, for outages: `stop()` it and `start()` it again
    (same port and data). Never the session's shared store, which other tests are using."""
    server = MongoStandIn(tmp_path / "private-nx-27017")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of one test's own, for outages: `kill()` it and `start()` it again (same
    port). Never the machine's shared Redis."""
    server = RedisServer(tmp_path / "private-redis")
    server.start()
    yield server
    server.kill()
