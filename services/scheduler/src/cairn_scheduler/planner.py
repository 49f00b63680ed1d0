"""Shard planning: pure functions from a job to its shards (deterministic, so a replanned job
yields the same shard keys and a redelivered command creates nothing new)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    index: int
    key: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def shard_key(job_id: str, index: int) -> str:
    return f"{job_id}:{index:04d}"


def plan_range(job_id: str, start: int, end: int, shards: int) -> list[ShardPlan]:
    """Split [start, end) into at most `shards` contiguous ranges whose sizes differ by at most one."""
    if end <= start:
        raise ValueError("empty key range")
    count = min(shards, end - start)
    size, extra = divmod(end - start, count)
    plans, lower = [], start
    for index in range(count):
        upper = lower + size + (1 if index < extra else 0)
        plans.append(ShardPlan(index, shard_key(job_id, index), lower, upper))
        lower = upper
    return plans
