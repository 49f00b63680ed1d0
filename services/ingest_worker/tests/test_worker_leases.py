"""ShardLeases against the MongoDB-wire server: claims, expiry, takeover and fencing."""

import time
from datetime import UTC, datetime, timedelta

from cairn_contracts.clock import now_ms
from cairn_contracts.states import ShardState
from cairn_contracts.store import CHECKPOINTS, SHARDS
from cairn_ingest_worker.leases import Heartbeat, ShardLeases
from cairn_ingest_worker.store import WriteCounts

TTL_S = 30.0
TINY_TTL_S = 0.05


def leases(db, worker: str, ttl_s: float = TTL_S) -> ShardLeases:
    return ShardLeases(db[SHARDS], db[CHECKPOINTS], worker, ttl_s)


def checkpoint(db, key: str) -> dict:
    return db[CHECKPOINTS].find_one({"shard_key": key})


def expire_after(ttl_s: float) -> None:
    time.sleep(ttl_s * 3)  # the lease deadline is ttl past the claim; wait well past it


def test_claim_takes_the_shard_and_adopts_the_checkpoint(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 100, 200)
    before = now_ms()

    claim = leases(db, "worker-a").claim(key)

    after = now_ms()
    assert claim is not None
    # A fresh shard: no cursor yet (the pipeline's `start` gives it), its position at range_start.
    assert (claim.token, claim.attempt, claim.cursor, claim.fresh, claim.shard_key) == (1, 1, None, True, key)
    assert checkpoint(db, key)["position"] == 100
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == ShardState.RUNNING
    assert shard["taken_by"] == "worker-a"
    assert (shard["fencing_token"], shard["attempts"]) == (1, 1)
    assert isinstance(shard["lease_until"], int)
    assert before + int(TTL_S * 1000) <= shard["lease_until"] <= after + int(TTL_S * 1000)
    assert checkpoint(db, key)["fencing_token"] == 1
    assert checkpoint(db, key)["taken_by"] == "worker-a"


def test_second_claim_while_the_lease_is_live_gets_nothing(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    first = leases(db, "worker-a").claim(key)

    assert leases(db, "worker-b").claim(key) is None
    assert leases(db, "worker-a").claim(key) is None  # not even the holder claims twice

    shard = db[SHARDS].find_one({"_id": key})
    assert (shard["fencing_token"], shard["attempts"], shard["taken_by"]) == (first.token, 1, "worker-a")


def test_claim_after_the_lease_expired_takes_over_with_a_higher_token(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    old = leases(db, "worker-a", TINY_TTL_S).claim(key)
    expire_after(TINY_TTL_S)

    new = leases(db, "worker-b").claim(key)

    assert new is not None
    assert new.token > old.token
    assert new.attempt == 2
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["taken_by"] == "worker-b" and shard["fencing_token"] == new.token
    assert checkpoint(db, key)["fencing_token"] == new.token


def test_after_takeover_the_old_claim_cannot_write(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 100)
    old_leases = leases(db, "worker-a", TINY_TTL_S)
    old = old_leases.claim(key)
    assert old_leases.commit(old, 10, 10, WriteCounts(inserted=10, duplicate=0)).stored
    expire_after(TINY_TTL_S)
    new_leases = leases(db, "worker-b")
    new = new_leases.claim(key)
    assert new.cursor == 10  # the new holder resumes from the old holder's last checkpoint
    checkpoint_before, shard_before = checkpoint(db, key), db[SHARDS].find_one({"_id": key})

    assert old_leases.commit(old, 20, 10, WriteCounts(inserted=10, duplicate=0)).stored is False
    assert old_leases.succeed(old) is False
    assert old_leases.renew(old) is False
    assert old_leases.fail(old, "boom", "dl-1") is False
    assert old_leases.schedule_retry(old, "boom", retry_at=datetime.now(UTC)) is False

    assert checkpoint(db, key) == checkpoint_before
    assert db[SHARDS].find_one({"_id": key}) == shard_before
    assert new_leases.commit(new, 20, 10, WriteCounts(inserted=10, duplicate=0)).stored is True
    assert checkpoint(db, key)["cursor"] == 20


def test_commit_moves_the_cursor_and_counts(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 100)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)

    assert lease.commit(claim, 10, 10, WriteCounts(inserted=8, duplicate=2)).stored
    assert lease.commit(claim, 20, 10, WriteCounts(inserted=10, duplicate=0)).stored

    doc = checkpoint(db, key)
    assert (doc["cursor"], doc["records_done"], doc["records_written"], doc["records_redone"], doc["batches"]) == (20, 20, 18, 2, 2)


def test_renew_extends_the_lease_of_the_holder(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a", TINY_TTL_S)
    claim = lease.claim(key)
    first_deadline = db[SHARDS].find_one({"_id": key})["lease_until"]
    time.sleep(0.01)

    assert lease.renew(claim) is True

    assert db[SHARDS].find_one({"_id": key})["lease_until"] > first_deadline


def test_succeeded_shard_is_never_claimed_again(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a", TINY_TTL_S)
    claim = lease.claim(key)

    assert lease.succeed(claim) is True
    expire_after(TINY_TTL_S)

    assert leases(db, "worker-b").claim(key) is None
    shard = db[SHARDS].find_one({"_id": key})
    assert shard["state"] == ShardState.SUCCEEDED and shard["taken_by"] is None


def test_fail_records_the_error_and_the_dead_letter(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)

    assert lease.fail(claim, "ValueError: bad", "dl-9") is True

    shard = db[SHARDS].find_one({"_id": key})
    assert (shard["state"], shard["last_error"], shard["dead_letter_id"]) == (ShardState.FAILED, "ValueError: bad", "dl-9")
    assert (shard["taken_by"], shard["ran_by"]) == (None, "worker-a")  # who ran it stays known (GET /v1/results)
    assert leases(db, "worker-b").claim(key) is None


def test_a_shard_scheduled_for_retry_is_claimable_again(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a")
    first = lease.claim(key)

    assert lease.schedule_retry(first, "RetryableError: blip", datetime.now(UTC)) is True
    shard = db[SHARDS].find_one({"_id": key})
    assert (shard["state"], shard["lease_until"], shard["last_error"]) == (ShardState.RETRY, None, "RetryableError: blip")

    second = leases(db, "worker-b").claim(key)
    assert second is not None and second.token == first.token + 1 and second.attempt == 2


def test_claim_of_an_unknown_shard_gets_nothing(db, seed_shard) -> None:
    assert leases(db, "worker-a").claim("nobody:0000") is None


def test_claim_refuses_a_checkpoint_held_by_a_newer_token(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    db[CHECKPOINTS].update_one({"shard_key": key}, {"$set": {"fencing_token": 99}})

    assert leases(db, "worker-a").claim(key) is None
    assert checkpoint(db, key)["fencing_token"] == 99


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_heartbeat_renews_the_lease_in_the_background(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a", 1.0)
    claim = lease.claim(key)
    first_deadline = db[SHARDS].find_one({"_id": key})["lease_until"]

    with Heartbeat(lease, claim, interval_s=0.02) as heartbeat:
        assert wait_until(lambda: db[SHARDS].find_one({"_id": key})["lease_until"] > first_deadline)
        assert not heartbeat.lost.is_set()


def test_heartbeat_reports_a_lost_lease(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    old_leases = leases(db, "worker-a", TINY_TTL_S)
    old = old_leases.claim(key)
    expire_after(TINY_TTL_S)
    assert leases(db, "worker-b").claim(key) is not None

    with Heartbeat(old_leases, old, interval_s=0.02) as heartbeat:
        assert heartbeat.lost.wait(timeout=5.0)


def test_hand_off_ends_the_lease_now_and_gives_the_attempt_back(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)

    assert lease.hand_off(claim) is True

    shard = db[SHARDS].find_one({"_id": key})
    assert (shard["state"], shard["lease_until"], shard["attempts"], shard["hand_offs"]) == (ShardState.RUNNING, 0, 0, 1)
    successor = leases(db, "worker-b").claim(key)
    assert successor is not None and successor.token == claim.token + 1 and successor.attempt == 1


def test_hand_off_by_a_stale_claim_changes_nothing(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    old_leases = leases(db, "worker-a", TINY_TTL_S)
    old = old_leases.claim(key)
    expire_after(TINY_TTL_S)
    leases(db, "worker-b").claim(key)
    before = db[SHARDS].find_one({"_id": key})

    assert old_leases.hand_off(old) is False
    assert db[SHARDS].find_one({"_id": key}) == before


def test_note_fenced_write_counts_refused_writes(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)

    lease.note_fenced_write(claim)
    lease.note_fenced_write(claim)

    assert db[SHARDS].find_one({"_id": key})["fenced_writes"] == 2


def test_claim_next_takes_the_first_claimable_item_of_the_job(db, seed_shard) -> None:
    keys = [seed_shard(db, "job", i, i * 10, i * 10 + 10, state=ShardState.PLANNED) for i in range(3)]
    seed_shard(db, "other", 0, 0, 10, state=ShardState.PLANNED)
    lease = leases(db, "worker-a")

    claims = [lease.claim_next("job") for _ in range(4)]

    assert [c.shard_key for c in claims[:3]] == keys
    assert claims[3] is None
    assert db[SHARDS].find_one({"_id": "other:0000"})["state"] == ShardState.PLANNED


def test_claim_next_waits_for_a_retry_to_be_due(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)
    lease.schedule_retry(claim, "blip", datetime.now(UTC) + timedelta(seconds=60))

    assert lease.claim_next("job") is None

    db[SHARDS].update_one({"_id": key}, {"$set": {"next_retry_at_ms": now_ms() - 1}})
    again = lease.claim_next("job")
    assert again is not None and again.shard_key == key and again.attempt == 2


def test_claim_next_takes_over_an_expired_item(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 10)
    first = leases(db, "worker-a", TINY_TTL_S).claim(key)
    assert leases(db, "worker-b").claim_next("job") is None
    expire_after(TINY_TTL_S)

    taken = leases(db, "worker-b").claim_next("job")

    assert taken is not None and taken.token == first.token + 1


def test_a_handed_off_lease_is_not_renewed(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 100)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)
    assert lease.hand_off(claim)

    assert lease.renew(claim) is False  # the continuation may claim at once
    assert db[SHARDS].find_one({"_id": key})["lease_until"] == 0
    assert leases(db, "worker-b").claim(key) is not None


def test_a_heartbeat_refused_after_a_takeover_counts_as_a_fenced_write(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 100)
    old_leases = leases(db, "worker-a", TINY_TTL_S)
    old = old_leases.claim(key)
    expire_after(TINY_TTL_S)
    assert leases(db, "worker-b").claim(key) is not None

    with Heartbeat(old_leases, old, interval_s=0.02) as heartbeat:
        assert heartbeat.lost.wait(5)

    assert db[SHARDS].find_one({"_id": key})["fenced_writes"] == 1


def test_a_heartbeat_that_ends_with_its_own_run_counts_no_fenced_write(db, seed_shard) -> None:
    key = seed_shard(db, "job", 0, 0, 100)
    lease = leases(db, "worker-a")
    claim = lease.claim(key)
    assert lease.succeed(claim)

    with Heartbeat(lease, claim, interval_s=0.02) as heartbeat:
        assert heartbeat.lost.wait(5)

    assert db[SHARDS].find_one({"_id": key}).get("fenced_writes", 0) == 0
