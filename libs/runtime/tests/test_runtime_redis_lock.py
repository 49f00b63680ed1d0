"""Locks changed only by their holder: compare and set / extend / delete, on the real Redis."""

import uuid

import pytest
import redis.asyncio as aioredis

from cairn_runtime.redis_lock import extend_if_held, job_lock_key, release_if_held, release_job_lock, replace_if_held


@pytest.fixture
def redis_client(async_redis: aioredis.Redis) -> aioredis.Redis:
    return async_redis


@pytest.fixture
def prefix(redis_prefix_of_test: str) -> str:
    return redis_prefix_of_test


async def test_only_the_holder_replaces_extends_or_releases_a_lock(redis_client, prefix) -> None:
    key = f"{prefix}:{uuid.uuid4().hex}"
    await redis_client.set(key, "job-a", px=10_000)

    assert await replace_if_held(redis_client, key, "job-b", "job-c", 10_000) is False
    assert await extend_if_held(redis_client, key, "job-b", 60_000) is False
    assert await release_if_held(redis_client, key, "job-b") is False
    assert await redis_client.get(key) == b"job-a" and await redis_client.pttl(key) <= 10_000

    assert await extend_if_held(redis_client, key, "job-a", 60_000) is True
    assert await redis_client.pttl(key) > 10_000
    assert await replace_if_held(redis_client, key, "job-a", "job-c", 5_000) is True
    assert await redis_client.get(key) == b"job-c" and await redis_client.pttl(key) <= 5_000
    assert await release_if_held(redis_client, key, "job-c") is True
    assert await redis_client.get(key) is None


async def test_a_finished_job_releases_its_fingerprint_lock_only_while_it_holds_it(redis_client, prefix) -> None:
    job = {"_id": "job-a", "tenant": "acme", "spec_fingerprint": uuid.uuid4().hex}
    key = job_lock_key(prefix, "acme", job["spec_fingerprint"])
    assert key == f"{prefix}:joblock:acme:{job['spec_fingerprint']}"

    await redis_client.set(key, "job-b")
    assert await release_job_lock(redis_client, prefix, job) is False  # taken by another job since
    await redis_client.set(key, "job-a")
    assert await release_job_lock(redis_client, prefix, job) is True
    assert await redis_client.get(key) is None
    assert await release_job_lock(redis_client, prefix, {"_id": "job-a", "tenant": "acme"}) is False  # no fingerprint
