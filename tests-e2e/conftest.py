"""End-to-end fixtures: the four services as separate processes against real servers."""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pymongo import MongoClient

from cairn_contracts.tenancy import MAX_CAIRN_DATABASE_NAME
from cairn_testkit.fixtures import AMQP_HOST, TestEnvironment
from cairn_testkit.servers import rabbitmq_vhost
from harness import System, build_system


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests-e2e" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def system(test_env: TestEnvironment, mongo_client: MongoClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """The whole system shared by the e2e tests that do not break parts of it. It has a vhost and
    database of its own, so its consumers never take messages the unit tests are reading."""
    with isolated_system(test_env, mongo_client, tmp_path_factory.mktemp("system"), "main") as system:
        yield system


@contextlib.contextmanager
def isolated_system(
    test_env: TestEnvironment, mongo_client: MongoClient, work_dir: Path, name: str, *, amqp_url: str | None = None, **options: Any
) -> Iterator[System]:
    """A second, fully separate system (own vhost or broker, own database) for tests that kill,
    freeze or restart its parts."""
    database = f"{test_env.mongodb_database}_{name}"
    assert len(database) <= MAX_CAIRN_DATABASE_NAME, f"system name {name!r} too long for a database name ({database!r})"
    with contextlib.ExitStack() as stack:
        if amqp_url is None:
            vhost = stack.enter_context(rabbitmq_vhost(f"cairn-test-{test_env.run_id}-{name}"))
            amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"
        else:
            vhost = "/"
        env = {**test_env.service_env(), "CAIRN_MONGODB_DATABASE": database, "CAIRN_AMQP_URL": amqp_url}
        system = build_system(env, mongo_client[database], vhost, amqp_url, work_dir, **options)
        try:
            system.start_services()
            yield system
        finally:
            system.stop_services()
            mongo_client.drop_database(database)
            for namespace in mongo_client.list_database_names():  # the tenants' namespaces (records, sources)
                if namespace.startswith((f"{database}_t_", f"{database}_th_")):
                    mongo_client.drop_database(namespace)


@pytest.fixture(scope="module")
def system_factory(
    test_env: TestEnvironment, mongo_client: MongoClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., System]]:
    with contextlib.ExitStack() as stack:

        def make(name: str, **options: Any) -> System:
            work_dir = tmp_path_factory.mktemp(f"system-{name}")
            return stack.enter_context(isolated_system(test_env, mongo_client, work_dir, name, **options))

        yield make
