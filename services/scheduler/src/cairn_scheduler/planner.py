"""Shard planning: pure functions from a job to its shards.

Planning is deterministic (same job → same shard keys and bounds), so a replanned job, a
redelivered command or a second scheduler creates nothing new. A strategy is a function
registered in `PLANNERS` under the name the contracts allow; adding one is adding a function.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from cairn_contracts.jobs import HashModSharding, LeaseFrontierSharding, RangeSharding


@dataclass(frozen=True)
class ShardPlan:
    index: int
    key: str
    start: int
    end: int
    records_estimate: int
    bucket: tuple[int, int] | None = None  # (modulus, remainder) for hash-mod shards


@dataclass(frozen=True)
class Plan:
    shards: list[ShardPlan]
    # How many runner tasks to dispatch: None means one task per shard (push); a number means
    # that many runners pull the shards by lease (lease frontier).
    runners: int | None = None


def shard_key(job_id: str, index: int) -> str:
    return f"{job_id}:{index:04d}"


def split_range(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) in at most `parts` contiguous ranges whose sizes differ by at most one."""
    if end <= start:
        raise ValueError("empty key range")
    count = min(parts, end - start)
    size, extra = divmod(end - start, count)
    bounds, lower = [], start
    for index in range(count):
        upper = lower + size + (1 if index < extra else 0)
        bounds.append((lower, upper))
        lower = upper
    return bounds


def plan_range(job_id: str, start: int, end: int, sharding: RangeSharding) -> Plan:
    return Plan(
        [ShardPlan(i, shard_key(job_id, i), lo, hi, hi - lo) for i, (lo, hi) in enumerate(split_range(start, end, sharding.shards))]
    )


def plan_hash_mod(job_id: str, start: int, end: int, sharding: HashModSharding) -> Plan:
    buckets = sharding.shards
    estimate = math.ceil((end - start) / buckets)
    return Plan([ShardPlan(i, shard_key(job_id, i), start, end, estimate, (buckets, i)) for i in range(buckets)])


def plan_lease_frontier(job_id: str, start: int, end: int, sharding: LeaseFrontierSharding) -> Plan:
    items = math.ceil((end - start) / sharding.item_size)
    shards = [
        ShardPlan(i, shard_key(job_id, i), lo, hi, hi - lo) for i, (lo, hi) in enumerate(split_range(start, end, items))
    ]
    return Plan(shards, runners=min(sharding.shards, len(shards)))


PLANNERS: dict[str, Callable[..., Plan]] = {
    "range": plan_range,
    "hash_mod": plan_hash_mod,
    "lease_frontier": plan_lease_frontier,
}


def plan_job(job_id: str, key_range: tuple[int, int], sharding: RangeSharding | HashModSharding | LeaseFrontierSharding) -> Plan:
    return PLANNERS[sharding.strategy](job_id, *key_range, sharding)
