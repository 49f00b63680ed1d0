"""Issue 14: claims that match on an indexed key and judge the rest in code (no `$or` filter a
server may run as a scan of every shard), and the lease frontier's counter on the job. Against
the MongoDB-wire server, observed with a command listener."""

from typing import Any

import pytest
from pymongo import MongoClient, monitoring

from cairn_contracts.clock import now_ms
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.leases import ShardLeases


class Filters(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        if isinstance(target, str) and event.command_name in ("find", "findAndModify"):
            query = event.command.get("filter") or event.command.get("query") or {}
            self.seen.append((event.command_name, target, dict(query)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def observed(db, test_env):
    filters = Filters()
    client: MongoClient = MongoClient(test_env.mongodb_uri, event_listeners=[filters], tz_aware=True)
    yield client[db.name], filters
    client.close()


def leases(db: Any, worker: str = "worker-a", ttl_s: float = 30.0) -> ShardLeases:
    return ShardLeases(db[SHARDS], db[CHECKPOINTS], worker, ttl_s, jobs=db[JOBS])


def frontier_job(db: Any, seed_shard: Any, job_id: str, items: int) -> list[str]:
    db[JOBS].insert_one({"_id": job_id, "state": "STARTED", "shard_count": items})
    return [seed_shard(db, job_id, i, i * 10, i * 10 + 10, state=ShardState.PLANNED) for i in range(items)]


def test_a_claim_reads_by_key_and_takes_by_compare_and_set(observed, seed_shard) -> None:
    db, filters = observed
    key = seed_shard(db, "job", 0, 0, 10)

    claim = leases(db).claim(key)

    assert claim is not None and claim.token == 1
    shard_filters = [query for _, target, query in filters.seen if target == SHARDS]
    assert shard_filters[0] == {"shard_key": key}
    assert all("$or" not in query and "job_id" not in query for query in shard_filters), shard_filters
    assert shard_filters[1]["shard_key"] == key and shard_filters[1]["state"] == ShardState.QUEUED
    assert leases(db, "worker-b").claim(key) is None  # live lease: judged in code, nothing written


def test_claim_next_hands_out_items_in_order_by_the_jobs_counter(observed, seed_shard) -> None:
    db, filters = observed
    keys = frontier_job(db, seed_shard, "fr", 3)
    seed_shard(db, "other", 0, 0, 10, state=ShardState.PLANNED)
    lease = leases(db)

    claims = [lease.claim_next("fr") for _ in range(3)]

    assert [c.shard_key for c in claims] == keys
    # Every item came from the counter: no scan of the job's items, no $or filter.
    assert not [q for _, target, q in filters.seen if target == SHARDS and ("job_id" in q or "$or" in q)], filters.seen
    assert lease.claim_next("fr") is None  # past the last item: the job's items are read once, none claimable
    assert db[SHARDS].find_one({"_id": "other:0000"})["state"] == ShardState.PLANNED


def test_claim_next_past_the_counter_finds_due_retries_and_expired_leases(db, seed_shard) -> None:
    keys = frontier_job(db, seed_shard, "tail", 2)
    first = leases(db, "worker-a", ttl_s=0.05)
    one, two = first.claim_next("tail"), first.claim_next("tail")
    assert (one.shard_key, two.shard_key) == tuple(keys)
    db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"state": ShardState.RETRY, "next_retry_at_ms": now_ms() + 60_000, "lease_until": None}})
    db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"lease_until": now_ms() + 60_000}})
    other = leases(db, "worker-b")

    assert other.claim_next("tail") is None  # a retry not due, a live lease

    db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"next_retry_at_ms": now_ms() - 1}})
    db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"lease_until": now_ms() - 1}})
    taken = [other.claim_next("tail"), other.claim_next("tail")]
    assert [c.shard_key for c in taken] == keys
    assert [c.token for c in taken] == [one.token + 1, two.token + 1]
    assert other.claim_next("tail") is None
