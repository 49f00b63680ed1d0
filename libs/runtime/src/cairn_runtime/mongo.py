"""MongoDB connections and the shared indexes. Plain MongoDB: nothing here knows the stand-in."""

from typing import Any

from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from cairn_contracts.store import INDEXES, IndexSpec

# Fail fast when the server is away instead of hanging a request for pymongo's default 30 s, and
# bound every round trip: pymongo's defaults wait forever on a connect or a read that never
# answers (a hung server, a half-open connection), which would hold a task delivery and its lease.
# A NetworkTimeout after socketTimeoutMS is a slow answer, not an outage (see the worker's errors).
_CLIENT_OPTIONS = {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000, "socketTimeoutMS": 60000, "tz_aware": True}


def async_client(uri: str, *, server_selection_timeout_ms: int | None = None) -> AsyncMongoClient:
    """`server_selection_timeout_ms`: how long an operation waits for a reachable server before
    ServerSelectionTimeoutError (default the shared 5 s; the gateway answers 503 sooner)."""
    options: dict[str, Any] = dict(_CLIENT_OPTIONS)
    if server_selection_timeout_ms is not None:
        options["serverSelectionTimeoutMS"] = server_selection_timeout_ms
    return AsyncMongoClient(uri, **options)


def sync_client(uri: str) -> MongoClient:
    return MongoClient(uri, **_CLIENT_OPTIONS)


def _index_options(spec: IndexSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"name": spec.name, "unique": spec.unique}
    if spec.partial_filter is not None:
        options["partialFilterExpression"] = spec.partial_filter  # MongoDB refuses it with `sparse`
    else:
        options["sparse"] = spec.sparse
    return options


async def ensure_indexes(db: AsyncDatabase) -> None:
    for spec in INDEXES:
        await db[spec.collection].create_index(list(spec.keys), **_index_options(spec))


def ensure_indexes_sync(db: Database) -> None:
    for spec in INDEXES:
        db[spec.collection].create_index(list(spec.keys), **_index_options(spec))
