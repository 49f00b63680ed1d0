"""Async helpers for the libraries' and services' own suites.

- `async_mongo_db`: the per-test `mongo_db` database, seen through pymongo's AsyncMongoClient
  (import the fixture into a conftest.py to use it).
- `redis_prefix_of_test` / `async_redis`: a Redis key prefix of the test's own (under the run's)
  and an async Redis client that deletes every key under it afterwards.
- `next_message` / `drain`: bounded reads from an aio-pika queue (duck-typed, so this module needs
  nothing beyond the testkit's own dependencies).
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient
from pymongo.database import Database

from cairn_testkit.fixtures import TestEnvironment


@pytest.fixture
def redis_prefix_of_test(test_env: TestEnvironment) -> str:
    """A Redis key prefix of this test's own, under the run's (`<run prefix>-t<hex>`)."""
    return f"{test_env.redis_prefix}-t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def async_redis(test_env: TestEnvironment, redis_prefix_of_test: str) -> AsyncIterator[aioredis.Redis]:
    """An async client of this run's Redis; every key under `redis_prefix_of_test` is deleted after the test."""
    client = aioredis.Redis.from_url(test_env.redis_url)
    try:
        yield client
        async for found in client.scan_iter(match=f"{redis_prefix_of_test}*"):
            await client.delete(found)
    finally:
        await client.aclose()


@pytest.fixture
async def async_mongo_db(mongo_db: Database, test_env: TestEnvironment) -> AsyncIterator[Any]:
    """The same fresh database as `mongo_db` (dropped afterwards by that fixture), for async code."""
    client: AsyncMongoClient = AsyncMongoClient(test_env.mongodb_uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    try:
        yield client[mongo_db.name]
    finally:
        await client.close()


async def next_message(queue: Any, *, timeout_s: float = 5.0, no_ack: bool = True, poll_s: float = 0.02) -> Any:
    """The next message of `queue` (basic.get), waiting at most `timeout_s`; AssertionError if none."""
    deadline = time.monotonic() + timeout_s
    while True:
        message = await queue.get(no_ack=no_ack, fail=False)
        if message is not None:
            return message
        if time.monotonic() > deadline:
            raise AssertionError(f"no message on {queue.name} within {timeout_s} s")
        await asyncio.sleep(poll_s)


async def drain(queue: Any) -> list[Any]:
    """Every message ready on `queue` now, acked (removed)."""
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages
