"""Fixtures of the gateway's tests: the gateway app run with its lifespan against a database of the
test module's own, and API clients of it holding keys of a tenant and scopes.

- `database` (module): a MongoDB database of this module, seeded with the pipeline catalog as a
  worker announces it (jobs are checked against it), dropped afterwards; `db` is it, as a pymongo
  Database.
- `settings` (module): GatewaySettings on this run's MongoDB, RabbitMQ vhost and a Redis prefix of
  the module's own. A module changes settings with a module-level dict, e.g.
  `GATEWAY_SETTINGS = {"max_body_bytes": 4096}`.
- `app` (module): `create_app(settings)` with its lifespan entered.
- `client_of(token)`: an httpx client of `app` (through ASGI) sending that bearer token.
- `client_for(tenant="default", scopes=("admin",), name=None, **key_options)`: an httpx client of
  `app` (through ASGI) holding a new API key of that tenant and scopes (named `name`, default
  "<tenant> test key"); `tenant=None` sends no key.
  Every client made is closed after the test.
"""

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pymongo import MongoClient
from pymongo.database import Database

from cairn_contracts.store import API_KEYS
from cairn_gateway.app import create_app
from cairn_gateway.auth import new_key
from cairn_gateway.settings import GatewaySettings
from cairn_testkit.catalog import seed_catalog
from cairn_testkit.fixtures import TestEnvironment


def _module_tag(request: pytest.FixtureRequest) -> str:
    """`ops_api` for test_gateway_ops_api.py: names the module's database and Redis prefix."""
    return request.module.__name__.rpartition(".")[2].removeprefix("test_gateway_")


@pytest.fixture(scope="module")
def database(mongo_client: MongoClient, test_env: TestEnvironment, request: pytest.FixtureRequest) -> Iterator[str]:
    # At most 35 characters (what CAIRN_MONGODB_DATABASE allows): the tag cut to 6.
    name = f"{test_env.mongodb_database}_g{_module_tag(request)[:6]}{uuid.uuid4().hex[:5]}"
    seed_catalog(mongo_client[name])
    yield name
    for existing in mongo_client.list_database_names():  # with the tenants' namespaces (<name>_t…)
        if existing == name or existing.startswith(f"{name}_t"):
            mongo_client.drop_database(existing)


@pytest.fixture(scope="module")
def db(mongo_client: MongoClient, database: str) -> Database:
    return mongo_client[database]


@pytest.fixture(scope="module")
def settings(test_env: TestEnvironment, database: str, request: pytest.FixtureRequest) -> GatewaySettings:
    options: dict[str, Any] = {
        "mongodb_uri": test_env.mongodb_uri,
        "mongodb_database": database,
        "amqp_url": test_env.amqp_url,
        "redis_url": test_env.redis_url,
        "redis_prefix": f"{test_env.redis_prefix}-gw{_module_tag(request)}",
    }
    options.update(getattr(request.module, "GATEWAY_SETTINGS", {}))
    return GatewaySettings(**options)


@pytest.fixture(scope="module")
async def app(settings: GatewaySettings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def api_key(db: Database, tenant: str, scopes: tuple[str, ...] | list[str], name: str | None = None, **options: Any) -> str:
    """A new API key of `tenant` with `scopes`, stored in `db`; returns its token."""
    document, token = new_key(tenant, scopes, name or f"{tenant} test key", **options)
    db[API_KEYS].insert_one(document)
    return token


@pytest.fixture
async def client_of(app: FastAPI) -> AsyncIterator[Callable[[str | None], httpx.AsyncClient]]:
    """`client_of(token)`: an httpx client of `app` sending `token` (None: no Authorization)."""
    made: list[httpx.AsyncClient] = []

    def make(token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers, timeout=20)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def client_for(db: Database, client_of: Callable[[str | None], httpx.AsyncClient]) -> Callable[..., httpx.AsyncClient]:
    def make(tenant: str | None = "default", scopes: tuple[str, ...] | list[str] = ("admin",), name: str | None = None, **key_options: Any) -> httpx.AsyncClient:
        return client_of(api_key(db, tenant, scopes, name, **key_options) if tenant is not None else None)

    return make
