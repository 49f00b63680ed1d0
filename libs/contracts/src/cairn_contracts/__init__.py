"""Cairn's contracts: the one place two services agree on anything."""

from cairn_contracts.jobs import (
    HashModSharding,
    JobSpec,
    LeaseFrontierSharding,
    RangeSharding,
    RetryPolicy,
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
from cairn_contracts.pipelines import CatalogEntry, CatalogRefusal, check_job
from cairn_contracts.states import DeadLetterStatus, JobState, Priority, ReplayOutcome, ShardState

__all__ = [
    "CatalogEntry",
    "CatalogRefusal",
    "check_job",
    "CancelJob",
    "DeadLetter",
    "DeadLetterCommand",
    "DeadLetterStatus",
    "HashModSharding",
    "JobSpec",
    "JobState",
    "LeaseFrontierSharding",
    "Message",
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
]
