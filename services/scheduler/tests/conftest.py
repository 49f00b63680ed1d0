import pytest

from cairn_runtime.mongo import ensure_indexes
from cairn_testkit.catalog import seed_catalog_async


@pytest.fixture
async def db(async_mongo_db):
    """The per-test database with the indexes every service creates at start-up."""
    await ensure_indexes(async_mongo_db)
    await seed_catalog_async(async_mongo_db)  # jobs recorded without a space are planned from it
    return async_mongo_db
