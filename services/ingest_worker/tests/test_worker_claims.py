"""Issue 14: claims that match on an indexed key and judge the rest in code (no `$or` filter a
server may run as a scan of every shard), and the lease frontier's counter on the job. Against
the MongoDB-wire server, observed with a command listener."""

from typing import Any

import pytest
from pymongo import MongoClient, monitoring

from cairn_contracts.clock import now_ms
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.leases import OneBatch, ShardLeases
from cairn_ingest_worker.store import WriteCounts


class Filters(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []  # reads and compare-and-sets
        self.writes: list[tuple[str, str, dict[str, Any]]] = []  # every filter of a write command

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        if not isinstance(target, str):
            return
        if event.command_name in ("find", "findAndModify"):
            query = event.command.get("filter") or event.command.get("query") or {}
            self.seen.append((event.command_name, target, dict(query)))
        if event.command_name == "findAndModify":
            self.writes.append((event.command_name, target, dict(event.command.get("query") or {})))
        elif event.command_name in ("update", "delete"):
            statements = event.command.get("updates") or event.command.get("deletes") or []
            self.writes.extend((event.command_name, target, dict(statement["q"])) for statement in statements)

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


def test_a_waiting_shard_is_taken_in_one_compare_and_set_by_key(observed, seed_shard) -> None:
    db, filters = observed
    key = seed_shard(db, "job", 0, 0, 10)

    claim = leases(db).claim(key)

    assert claim is not None and claim.token == 1
    shard_commands = [(name, query) for name, target, query in filters.seen if target == SHARDS]
    # One round trip on the shard: the compare-and-set itself, by its `_id` (the shard key), no read first.
    assert [name for name, _ in shard_commands] == ["findAndModify"], shard_commands
    query = shard_commands[0][1]
    assert query["_id"] == key and "shard_key" not in query and query["state"] == {"$in": [ShardState.PLANNED, ShardState.QUEUED]}
    assert "$or" not in query and "job_id" not in query


def test_a_held_shard_is_read_by_key_and_judged_in_code(observed, seed_shard) -> None:
    db, filters = observed
    key = seed_shard(db, "job", 0, 0, 10)
    assert leases(db).claim(key) is not None
    filters.seen.clear()

    assert leases(db, "worker-b").claim(key) is None  # live lease: judged in code, nothing written

    shard_filters = [query for _, target, query in filters.seen if target == SHARDS]
    assert {"_id": key} in shard_filters
    assert all("$or" not in query and "job_id" not in query for query in shard_filters), shard_filters
    assert db[SHARDS].find_one({"_id": key})["fencing_token"] == 1


def test_every_write_of_a_shard_or_checkpoint_goes_by_id(observed, seed_shard) -> None:
    """A run's writes (claim, adopt, commit, renew, hand-off, succeed; a bundle's bulk claim, start
    and finish) address one shard or checkpoint by `_id`: the primary key every server serves
    from its index, where the stand-in scans the whole collection for a write on `shard_key`."""
    db, filters = observed
    alone = seed_shard(db, "job", 0, 0, 10)
    bundled = [seed_shard(db, "job", i, i * 10, i * 10 + 10) for i in range(1, 4)]
    lease = leases(db)

    claim = lease.claim(alone)
    assert claim is not None and lease.renew(claim)
    assert lease.commit(claim, 10, 10, WriteCounts(inserted=10)).stored
    assert lease.hand_off(claim)
    claim = lease.claim(alone)
    assert claim is not None and lease.succeed(claim, {"records_done": 10})
    claims = lease.claim_waiting(bundled)
    started = lease.start_all(list(claims.values()))
    assert lease.renew_all(started) == 3
    finished, _ = lease.finish_all([OneBatch(c, 10, None, 10, WriteCounts(inserted=10)) for c in started])
    assert finished == set(bundled)

    writes = [(name, target, query) for name, target, query in filters.writes if target in (SHARDS, CHECKPOINTS)]
    assert {target for _, target, _ in writes} == {SHARDS, CHECKPOINTS}
    assert all("_id" in query and "shard_key" not in query for _, _, query in writes), writes


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

    # Both were once claimed in one frontier block (its task for fair dispatch, `queued_task`).
    db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"next_retry_at_ms": now_ms() - 1, "queued_task": keys[0]}})
    db[SHARDS].update_one({"_id": keys[1]}, {"$set": {"lease_until": now_ms() - 1, "queued_task": keys[0]}})
    taken = [other.claim_next("tail"), other.claim_next("tail")]
    assert [c.shard_key for c in taken] == keys
    assert [c.token for c in taken] == [one.token + 1, two.token + 1]
    assert other.claim_next("tail") is None
    # Each claimed alone now: a task of its own each, not one under the old block's key.
    assert [db[SHARDS].find_one({"_id": key})["queued_task"] for key in keys] == [None, None]


def test_claim_next_takes_the_counter_a_block_at_a_time(observed, seed_shard) -> None:
    db, filters = observed
    keys = frontier_job(db, seed_shard, "blk", 8)
    lease = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", 30.0, jobs=db[JOBS], frontier_block=4)

    claims = [lease.claim_next("blk") for _ in range(8)]

    assert [c.shard_key for c in claims] == keys
    counter_writes = [q for name, target, q in filters.seen if name == "findAndModify" and target == JOBS]
    assert len(counter_writes) == 2  # 8 items, blocks of 4: two $inc of the job document, not eight
    assert db[JOBS].find_one({"_id": "blk"})["frontier_next"] == 8


def test_items_of_a_block_never_run_are_claimed_by_another_runner_past_the_counter(db, seed_shard) -> None:
    keys = frontier_job(db, seed_shard, "left", 5)
    dead = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-a", 30.0, jobs=db[JOBS], frontier_block=2)
    assert dead.claim_next("left").shard_key == keys[0]  # took items 0 and 1, ran 0, then died
    db[SHARDS].update_one({"_id": keys[0]}, {"$set": {"state": ShardState.SUCCEEDED}})
    other = ShardLeases(db[SHARDS], db[CHECKPOINTS], "worker-b", 30.0, jobs=db[JOBS], frontier_block=2)

    taken = []
    while (claim := other.claim_next("left")) is not None:
        taken.append(claim.shard_key)
        db[SHARDS].update_one({"_id": claim.shard_key}, {"$set": {"state": ShardState.SUCCEEDED}})

    assert sorted(taken) == keys[1:]  # item 1 (the dead runner's block) too, once the counter was past the end
    assert taken[-1] == keys[1]
