"""Shard planning (pure functions) and job_state_from."""

from collections import Counter

import pytest

from cairn_contracts.jobs import HashModSharding, LeaseFrontierSharding, RangeSharding
from cairn_contracts.states import JobState, ShardState
from cairn_scheduler.jobs import job_state_from
from cairn_scheduler.planner import plan_hash_mod, plan_job, plan_lease_frontier, plan_range, shard_key, split_range


def bounds(plan) -> list[tuple[int, int]]:
    return [(p.start, p.end) for p in plan.shards]


@pytest.mark.parametrize("start, end, shards", [(0, 10, 3), (0, 1000, 7), (5, 6, 1), (-50, 50, 16), (0, 1024, 1024), (3, 100, 1)])
def test_plan_range_covers_the_range_contiguously_with_near_equal_sizes(start: int, end: int, shards: int) -> None:
    plan = plan_range("job", start, end, RangeSharding(shards=shards))

    assert plan.runners is None  # one pushed task per shard
    assert len(plan.shards) == shards
    assert plan.shards[0].start == start and plan.shards[-1].end == end
    assert all(a.end == b.start for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    sizes = [p.end - p.start for p in plan.shards]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1
    assert sum(sizes) == end - start
    assert [p.records_estimate for p in plan.shards] == sizes
    assert [p.index for p in plan.shards] == list(range(shards))
    assert all(p.bucket is None for p in plan.shards)


def test_split_range_gives_the_larger_parts_first() -> None:
    assert split_range(0, 10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_plan_range_plans_fewer_shards_when_the_range_is_smaller() -> None:
    plan = plan_range("job", 10, 13, RangeSharding(shards=8))

    assert bounds(plan) == [(10, 11), (11, 12), (12, 13)]


def test_planning_is_deterministic() -> None:
    for sharding in (RangeSharding(shards=5), HashModSharding(shards=5), LeaseFrontierSharding(shards=2, item_size=100)):
        assert plan_job("job-a", (0, 999), sharding) == plan_job("job-a", (0, 999), sharding)


def test_shard_keys_derive_from_job_and_index() -> None:
    plan = plan_range("job-a", 0, 30, RangeSharding(shards=3))

    assert [p.key for p in plan.shards] == ["job-a:0000", "job-a:0001", "job-a:0002"]
    assert shard_key("job-a", 17) == "job-a:0017"
    other = plan_range("job-b", 0, 30, RangeSharding(shards=3))
    assert {p.key for p in other.shards}.isdisjoint(p.key for p in plan.shards)


@pytest.mark.parametrize("start, end", [(5, 5), (6, 5)])
def test_split_range_rejects_an_empty_range(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        split_range(start, end, 2)


def test_hash_mod_gives_every_bucket_the_whole_range() -> None:
    plan = plan_hash_mod("job", 100, 200, HashModSharding(shards=4))

    assert plan.runners is None
    assert bounds(plan) == [(100, 200)] * 4
    assert [p.bucket for p in plan.shards] == [(4, 0), (4, 1), (4, 2), (4, 3)]
    assert [p.records_estimate for p in plan.shards] == [25] * 4


def test_lease_frontier_cuts_items_of_item_size_and_caps_the_runners() -> None:
    plan = plan_lease_frontier("job", 0, 95, LeaseFrontierSharding(shards=20, item_size=10))

    assert len(plan.shards) == 10
    assert plan.shards[0].start == 0 and plan.shards[-1].end == 95
    assert all(a.end == b.start for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    assert all(p.end - p.start <= 10 for p in plan.shards)
    assert plan.runners == 10  # never more runners than items


def test_lease_frontier_runners_follow_the_requested_shards() -> None:
    assert plan_lease_frontier("job", 0, 1000, LeaseFrontierSharding(shards=3, item_size=10)).runners == 3


def test_plan_job_dispatches_on_the_strategy() -> None:
    assert plan_job("job", (0, 10), RangeSharding(shards=2)) == plan_range("job", 0, 10, RangeSharding(shards=2))
    assert plan_job("job", (0, 10), HashModSharding(shards=2)) == plan_hash_mod("job", 0, 10, HashModSharding(shards=2))


@pytest.mark.parametrize(
    "states, expected",
    [
        ({ShardState.SUCCEEDED: 3}, JobState.SUCCESS),
        ({ShardState.SUCCEEDED: 2, ShardState.FAILED: 1}, JobState.FAILURE),
        ({ShardState.FAILED: 3}, JobState.FAILURE),
        ({ShardState.SUCCEEDED: 2, ShardState.RETRY: 1}, JobState.RETRY),
        ({ShardState.FAILED: 1, ShardState.RETRY: 1, ShardState.RUNNING: 1}, JobState.RETRY),
        ({ShardState.SUCCEEDED: 1, ShardState.RUNNING: 1, ShardState.QUEUED: 1}, JobState.STARTED),
        ({ShardState.PLANNED: 3}, JobState.STARTED),
        ({ShardState.SUCCEEDED: 2}, JobState.STARTED),  # one shard not even recorded
        ({}, JobState.STARTED),
    ],
)
def test_job_state_from_shard_states(states: dict, expected: JobState) -> None:
    assert job_state_from(Counter(states), 3) is expected
