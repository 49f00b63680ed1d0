"""Shard planning: pure functions from a job to its shards.

Planning is deterministic (same job → same shard keys and bounds), so a replanned job, a
redelivered command or a second scheduler creates nothing new. A strategy is a function
registered in `PLANNERS` under the name the contracts allow; adding one is adding a function.

A plan's shards are computed on demand (`ContiguousShards`): shard i's bounds are arithmetic on
i, so a plan costs the same memory whatever its size, and the scheduler records it chunk by chunk.
How many shards a job may plan is bounded by the contracts (`MAX_ITEMS_PER_JOB`).
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import overload

from cairn_contracts.jobs import HashModSharding, LeaseFrontierSharding, RangeSharding, lease_frontier_items
from cairn_contracts.store import shard_key_for


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
    shards: Sequence[ShardPlan]
    # How many runner tasks to dispatch: None means one task per shard (push); a number means
    # that many runners pull the shards by lease (lease frontier).
    runners: int | None = None

    def chunks(self, size: int) -> Iterator[list[ShardPlan]]:
        """The shards in index order, `size` at a time: what the scheduler writes per round trip."""
        shards = iter(self.shards)
        while chunk := list(islice(shards, size)):
            yield chunk


def shard_key(job_id: str, index: int) -> str:
    return shard_key_for(job_id, index)


def _range_part(start: int, end: int, parts: int, index: int) -> tuple[int, int]:
    """Part `index` of [start, end) cut into `parts` near-equal parts, the larger ones first."""
    size, extra = divmod(end - start, parts)
    lower = start + index * size + min(index, extra)
    return lower, lower + size + (1 if index < extra else 0)


def split_range(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) in at most `parts` contiguous ranges whose sizes differ by at most one."""
    if end <= start:
        raise ValueError("empty key range")
    count = min(parts, end - start)
    return [_range_part(start, end, count, index) for index in range(count)]


@dataclass(frozen=True)
class ContiguousShards(Sequence[ShardPlan]):
    """[start, end) cut into `parts` contiguous near-equal shards (as `split_range`), each
    computed when it is asked for: iterating a plan of any size holds one shard at a time."""

    job_id: str
    start: int
    end: int
    parts: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError("empty key range")
        object.__setattr__(self, "parts", min(self.parts, self.end - self.start))

    def __len__(self) -> int:
        return self.parts

    @overload
    def __getitem__(self, index: int) -> ShardPlan: ...
    @overload
    def __getitem__(self, index: slice) -> list[ShardPlan]: ...
    def __getitem__(self, index: int | slice) -> ShardPlan | list[ShardPlan]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.parts))]
        if index < 0:
            index += self.parts
        if not 0 <= index < self.parts:
            raise IndexError(index)
        lower, upper = _range_part(self.start, self.end, self.parts, index)
        return ShardPlan(index, shard_key(self.job_id, index), lower, upper, upper - lower)


def plan_range(job_id: str, start: int, end: int, sharding: RangeSharding) -> Plan:
    return Plan(ContiguousShards(job_id, start, end, sharding.shards))


def plan_hash_mod(job_id: str, start: int, end: int, sharding: HashModSharding) -> Plan:
    buckets = sharding.shards
    estimate = -(-(end - start) // buckets)  # integer ceiling: keys reach 2^63, beyond a float's precision
    return Plan([ShardPlan(i, shard_key(job_id, i), start, end, estimate, (buckets, i)) for i in range(buckets)])


def plan_lease_frontier(job_id: str, start: int, end: int, sharding: LeaseFrontierSharding) -> Plan:
    shards = ContiguousShards(job_id, start, end, lease_frontier_items((start, end), sharding.item_size))
    return Plan(shards, runners=min(sharding.shards, len(shards)))


PLANNERS: dict[str, Callable[..., Plan]] = {
    "range": plan_range,
    "hash_mod": plan_hash_mod,
    "lease_frontier": plan_lease_frontier,
}


def plan_job(job_id: str, key_range: tuple[int, int], sharding: RangeSharding | HashModSharding | LeaseFrontierSharding) -> Plan:
    return PLANNERS[sharding.strategy](job_id, *key_range, sharding)
