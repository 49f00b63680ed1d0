"""MongoDB connections and the shared indexes. Plain MongoDB: nothing here knows the stand-in."""

from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from cairn_contracts.store import INDEXES, IndexSpec

# Fail fast when the server is away instead of hanging a request for pymongo's default 30 s, and
# bound every round trip: pymongo's defaults wait forever on a connect or a read that never
# answers (a hung server, a half-open connection), which would hold a task delivery and its lease.
# A NetworkTimeout after socketTimeoutMS is a slow answer, not an outage (see the worker's errors).
_CLIENT_OPTIONS: dict[str, Any] = {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000, "socketTimeoutMS": 60000, "tz_aware": True}


def async_client(
    uri: str, *, server_selection_timeout_ms: int | None = None, operation_timeout_ms: int | None = None
) -> AsyncMongoClient:
    """`server_selection_timeout_ms`: how long an operation waits for a reachable server before
    ServerSelectionTimeoutError (default the shared 5 s; the gateway answers 503 sooner).
    `operation_timeout_ms`: pymongo's client-side operation timeout (`timeoutMS`): the longest
    one operation may take in all, reachable server or not (NetworkTimeout / ExecutionTimeout
    past it); None: only the socket timeout bounds it (60 s)."""
    options: dict[str, Any] = dict(_CLIENT_OPTIONS)
    if server_selection_timeout_ms is not None:
        options["serverSelectionTimeoutMS"] = server_selection_timeout_ms
    if operation_timeout_ms is not None:
        options["timeoutMS"] = operation_timeout_ms
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


# --- inserting what is not there yet ----------------------------------------------------------
DUPLICATE_KEY = 11000  # MongoDB's error code of a write refused by a unique index


@dataclass(frozen=True)
class Inserted:
    written: int  # documents inserted by this call
    duplicates: int  # documents skipped: one with the same unique key was already there


def _already_there(error: BulkWriteError) -> Inserted:
    """The outcome of an unordered insert_many that failed on some documents: only duplicate keys
    are expected (a re-run batch, a replanned job); any other write error is raised again."""
    write_errors = error.details.get("writeErrors", [])
    if any(e.get("code") != DUPLICATE_KEY for e in write_errors):
        raise error
    return Inserted(error.details.get("nInserted", 0), len(write_errors))


async def insert_new(collection: AsyncCollection, documents: list[dict[str, Any]]) -> Inserted:
    """Insert the documents whose unique keys (`_id` or a unique index) are not taken yet; those
    already there are left as they are and counted, not overwritten. Unordered: one duplicate
    does not stop the others. Raises BulkWriteError for any other write error."""
    if not documents:
        return Inserted(0, 0)
    try:
        result = await collection.insert_many(documents, ordered=False)
    except BulkWriteError as error:
        return _already_there(error)
    return Inserted(len(result.inserted_ids), 0)


def insert_new_sync(collection: Collection, documents: list[dict[str, Any]]) -> Inserted:
    """`insert_new` for synchronous pymongo (the Celery worker)."""
    if not documents:
        return Inserted(0, 0)
    try:
        result = collection.insert_many(documents, ordered=False)
    except BulkWriteError as error:
        return _already_there(error)
    return Inserted(len(result.inserted_ids), 0)
