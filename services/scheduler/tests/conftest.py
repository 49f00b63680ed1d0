import pytest

from cairn_runtime.mongo import ensure_indexes


@pytest.fixture
async def db(async_mongo_db):
    """The per-test database with the indexes every service creates at start-up."""
    await ensure_indexes(async_mongo_db)
    return async_mongo_db
