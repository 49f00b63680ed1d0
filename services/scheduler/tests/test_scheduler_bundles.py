"""Which shards go in a bundle (bundles.py): pure decisions, no services."""

import pytest
from pydantic import ValidationError

from cairn_contracts.messages import MAX_BUNDLE_SHARDS, RunShard, RunShards
from cairn_scheduler.bundles import PlannedShard, shard_tasks


def planned(sizes: list[int]) -> list[PlannedShard]:
    return [PlannedShard(f"job:{i:04d}", size) for i, size in enumerate(sizes)]


def test_consecutive_small_shards_are_bundled_up_to_one_batch_of_records() -> None:
    tasks = shard_tasks("job", planned([300, 300, 300, 300, 100]), batch_size=1000)
    assert tasks == [RunShards(job_id="job", shard_keys=["job:0000", "job:0001", "job:0002"]),
                     RunShards(job_id="job", shard_keys=["job:0003", "job:0004"])]


def test_large_and_unknown_shards_go_alone_and_a_bundle_of_one_is_a_run_shard() -> None:
    tasks = shard_tasks("job", planned([2000, 500, 0, 400]), batch_size=1000)
    assert tasks == [RunShard(job_id="job", shard_key="job:0000"), RunShard(job_id="job", shard_key="job:0001"),
                     RunShard(job_id="job", shard_key="job:0002"), RunShard(job_id="job", shard_key="job:0003")]


def test_a_bundle_holds_at_most_max_shards_and_1_turns_bundles_off() -> None:
    tasks = shard_tasks("job", planned([1] * 150), batch_size=1000)
    assert [len(t.shard_keys) for t in tasks if isinstance(t, RunShards)] == [MAX_BUNDLE_SHARDS, MAX_BUNDLE_SHARDS, 22]
    assert shard_tasks("job", planned([1, 1]), batch_size=1000, max_shards=1) == [
        RunShard(job_id="job", shard_key="job:0000"), RunShard(job_id="job", shard_key="job:0001")]


def test_a_bundle_names_only_its_jobs_shards_each_once() -> None:
    with pytest.raises(ValidationError, match="one of its job's"):
        RunShards(job_id="job", shard_keys=["other:0000"])
    with pytest.raises(ValidationError, match="each shard once"):
        RunShards(job_id="job", shard_keys=["job:0000", "job:0000"])
    with pytest.raises(ValidationError):
        RunShards(job_id="job", shard_keys=[f"job:{i:04d}" for i in range(MAX_BUNDLE_SHARDS + 1)])
