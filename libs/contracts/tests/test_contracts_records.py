"""The stored layouts of shards and checkpoints (planning inserts them; tests seed them alike),
and the named state sets services query by."""

from datetime import UTC, datetime

from cairn_contracts.states import (
    ACTIVE_JOB_STATES,
    TERMINAL_JOB_STATES,
    TERMINAL_SHARD_STATES,
    WAITING_SHARD_STATES,
    JobState,
    ShardState,
    state_values,
)
from cairn_contracts.store import MAIN_SUB_KEY, NOT_CANCELLED, ShardBucket, ShardRecord

NOW = datetime(2026, 1, 2, tzinfo=UTC)


def test_a_planned_shard_and_its_checkpoint_as_stored() -> None:
    shard = ShardRecord(
        shard_key="job:0001", job_id="job", index=1, strategy="hash_mod", range_start=0, range_end=100,
        bucket=ShardBucket(modulus=4, remainder=1), records_estimate=25, priority=3, created_at=NOW,
    )

    assert shard.to_document() == {
        "_id": "job:0001", "shard_key": "job:0001", "job_id": "job", "index": 1, "strategy": "hash_mod",
        "range_start": 0, "range_end": 100, "bucket": {"modulus": 4, "remainder": 1}, "records_estimate": 25,
        "priority": 3, "state": "PLANNED", "attempts": 0, "fencing_token": 0, "lease_until": None, "taken_by": None,
        "job_created_at_ms": None, "created_at": NOW,
    }
    assert shard.checkpoint().to_document() == {
        "_id": f"job:0001/{MAIN_SUB_KEY}", "shard_key": "job:0001", "sub_key": MAIN_SUB_KEY, "job_id": "job",
        "cursor": None, "position": 0, "range_start": 0, "range_end": 100, "records_estimate": 25, "records_done": 0,
        "records_written": 0, "records_redone": 0, "records_inserted": 0, "records_updated": 0,
        "records_unchanged": 0, "records_duplicate": 0, "batches": 0, "fencing_token": 0, "job_created_at_ms": None,
        "updated_at": NOW,
    }
    # The lease protocol's writes match "not cancelled" as a missing field (NOT_CANCELLED): a
    # planned record carrying `cancel_requested: false` would never be claimed.
    assert NOT_CANCELLED == {"cancel_requested": None}
    assert "cancel_requested" not in shard.to_document() and "cancel_requested" not in shard.checkpoint().to_document()


def test_the_state_sets_partition_the_states_and_query_as_plain_sorted_strings() -> None:
    assert ACTIVE_JOB_STATES | TERMINAL_JOB_STATES == set(JobState) - {JobState.CANCELLING}
    assert not ACTIVE_JOB_STATES & TERMINAL_JOB_STATES
    assert WAITING_SHARD_STATES | TERMINAL_SHARD_STATES | {ShardState.RUNNING} == set(ShardState)
    assert state_values(WAITING_SHARD_STATES) == ["PLANNED", "QUEUED", "RETRY"]
    assert all(type(value) is str for value in state_values(TERMINAL_JOB_STATES))
