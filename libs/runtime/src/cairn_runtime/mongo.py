"""MongoDB connections and the shared indexes. Plain MongoDB: nothing here knows the stand-in."""

from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from cairn_contracts.store import INDEXES

# Fail fast when the server is away instead of hanging a request for pymongo's default 30 s.
_CLIENT_OPTIONS = {"serverSelectionTimeoutMS": 5000, "tz_aware": True}


def async_client(uri: str) -> AsyncMongoClient:
    return AsyncMongoClient(uri, **_CLIENT_OPTIONS)


def sync_client(uri: str) -> MongoClient:
    return MongoClient(uri, **_CLIENT_OPTIONS)


async def ensure_indexes(db: AsyncDatabase) -> None:
    for spec in INDEXES:
        await db[spec.collection].create_index(
            list(spec.keys), name=spec.name, unique=spec.unique, sparse=spec.sparse
        )


def ensure_indexes_sync(db: Database) -> None:
    for spec in INDEXES:
        db[spec.collection].create_index(
            list(spec.keys), name=spec.name, unique=spec.unique, sparse=spec.sparse
        )
