"""End-to-end fixtures: the four services as separate processes against real servers."""

from collections.abc import Iterator
from urllib.parse import unquote, urlparse

import pytest
from pymongo import MongoClient

from cairn_testkit.fixtures import TestEnvironment
from harness import System, build_system


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests-e2e" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def system(test_env: TestEnvironment, mongo_client: MongoClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    vhost = unquote(urlparse(test_env.amqp_url).path.lstrip("/"))
    system = build_system(
        test_env.service_env(),
        mongo_client[test_env.mongodb_database],
        vhost,
        test_env.amqp_url,
        tmp_path_factory.mktemp("system"),
    )
    try:
        system.start_services()
        yield system
    finally:
        system.stop_services()
