"""cairn_sdk: the public API to write a Cairn pipeline.

A pipeline imports only this package (and its own libraries: pydantic, pymongo, httpx...),
never Cairn's services. It is discovered from the entry point group `cairn.pipelines`
(name = the pipeline's name, value = "module:Class"). See README "Write your own pipeline".
"""

from cairn_sdk.effects import Effect, EffectBusy, EffectLedger, Effects, LocalEffects
from cairn_sdk.errors import FailurePolicy, HttpStatusError, NonRetryableError, RetryableError
from cairn_sdk.pipeline import (
    Batch,
    Bounds,
    Bucket,
    Cursor,
    MissingSecret,
    Pipeline,
    RunContext,
    SecretNotAllowed,
    host_matches,
    stable_hash,
)
from cairn_sdk.space import Interval, KeyRange, Single, Space, SpaceError, TimeRange, WorkItems, describe, epoch_ms, from_epoch_ms, resolve

ENTRY_POINT_GROUP = "cairn.pipelines"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "Bounds",
    "Bucket",
    "Cursor",
    "Effect",
    "EffectBusy",
    "EffectLedger",
    "Effects",
    "FailurePolicy",
    "HttpStatusError",
    "Interval",
    "KeyRange",
    "LocalEffects",
    "MissingSecret",
    "NonRetryableError",
    "Pipeline",
    "RetryableError",
    "RunContext",
    "SecretNotAllowed",
    "Single",
    "Space",
    "SpaceError",
    "TimeRange",
    "WorkItems",
    "describe",
    "host_matches",
    "epoch_ms",
    "from_epoch_ms",
    "resolve",
    "stable_hash",
]
