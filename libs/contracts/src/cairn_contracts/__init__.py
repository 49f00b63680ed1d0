"""Cairn's contracts: the one place two services agree on anything."""

from cairn_contracts.jobs import (
    HashModSharding,
    JobSpec,
    LeaseFrontierSharding,
    MongoRangeJobSpec,
    RangeSharding,
    RetryPolicy,
    SyntheticJobSpec,
)
from cairn_contracts.messages import (
    CancelJob,
    DeadLetter,
    DeadLetterCommand,
    Message,
    OriginalMessage,
    RunFrontier,
    RunShard,
    ShardFinished,
    StartJob,
)
from cairn_contracts.pipelines import MongoRangeParams, SyntheticParams
from cairn_contracts.states import DeadLetterStatus, JobState, Priority, ReplayOutcome, ShardState

__all__ = [
    "CancelJob",
    "DeadLetter",
    "DeadLetterCommand",
    "DeadLetterStatus",
    "HashModSharding",
    "JobSpec",
    "JobState",
    "LeaseFrontierSharding",
    "Message",
    "MongoRangeJobSpec",
    "MongoRangeParams",
    "OriginalMessage",
    "Priority",
    "RangeSharding",
    "ReplayOutcome",
    "RetryPolicy",
    "RunFrontier",
    "RunShard",
    "ShardFinished",
    "ShardState",
    "StartJob",
    "SyntheticJobSpec",
    "SyntheticParams",
]
