"""Cairn's contracts: the one place two services agree on anything."""

from cairn_contracts.jobs import JobSpec, MongoRangeJobSpec, RangeSharding, SyntheticJobSpec
from cairn_contracts.messages import (
    DeadLetter,
    Message,
    OriginalMessage,
    RunShard,
    ShardFinished,
    StartJob,
)
from cairn_contracts.pipelines import MongoRangeParams, SyntheticParams
from cairn_contracts.states import JobState, Priority, ShardState

__all__ = [
    "DeadLetter",
    "JobSpec",
    "JobState",
    "Message",
    "MongoRangeJobSpec",
    "MongoRangeParams",
    "OriginalMessage",
    "Priority",
    "RangeSharding",
    "RunShard",
    "ShardFinished",
    "ShardState",
    "StartJob",
    "SyntheticJobSpec",
    "SyntheticParams",
]
