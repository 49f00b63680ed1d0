"""Deterministic generated records, with knobs for size, slowness and injected failures.

Its work space is the integer keys [start, start + count); the cursor is the next key (an int).
"""

import hashlib
import logging
import os
import signal
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cairn_contracts.pipelines import SYNTHETIC
from cairn_sdk import Batch, Bounds, FailurePolicy, KeyRange, NonRetryableError, Pipeline, RetryableError

logger = logging.getLogger(__name__)

FailureKind = Literal["non_retryable", "retryable", "crash"]

# Keys are stored as MongoDB 64-bit integers: a larger number could never be recorded, so it is
# refused as the client's error (422 on the field), not found out at the insert (500).
MAX_KEY = 2**62


class SyntheticParams(BaseModel):
    """Deterministic generated records: record i of a job is the same on every run."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: int = Field(0, ge=0, le=MAX_KEY, description="First record key")
    count: int = Field(..., ge=1, le=1_000_000_000, description="Number of records")
    record_size: int = Field(100, ge=1, le=1_048_576, description="Bytes of payload per record")
    delay_ms_per_record: float = Field(0, ge=0, le=10_000, description="Simulated work per record")
    key_prefix: str = Field("syn", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    fail_at_key: int | None = Field(None, ge=0, le=MAX_KEY, description="Inject a failure when reaching this key")
    failure: FailureKind = Field("non_retryable", description="What the injected failure does")
    fail_times: int | None = Field(
        None, ge=1, le=1_000_000, description="Fail only on the first N attempts of the shard (default: always)"
    )

    def record_key(self, index: int) -> str:
        return f"{self.key_prefix}-{index:012d}"


class SyntheticPipeline(Pipeline[SyntheticParams]):
    """Deterministic generated records (record i is the same on every run), for tests and benchmarks."""

    name = SYNTHETIC
    version = "2"
    description = "Deterministic generated records (record i is the same on every run), with injectable slowness and failures"
    Params = SyntheticParams
    space = KeyRange(start_field="start", end_field=None, count_field="count")
    failures = FailurePolicy()  # the defaults: RetryableError / NonRetryableError

    def __init__(self, params: SyntheticParams, context: Any) -> None:
        super().__init__(params, context)
        self._filler = ("cairn" * (params.record_size // 5 + 1))[: params.record_size]

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        keys = self._keys(bounds, int(cursor), limit)
        stop = keys[-1] + 1 if keys else bounds.end
        fail_at = self.params.fail_at_key
        if fail_at is not None and fail_at in keys and self.failure_applies():
            self._fail(fail_at)
        if self.params.delay_ms_per_record:
            time.sleep(self.params.delay_ms_per_record * len(keys) / 1000)
        return Batch([self._record(i) for i in keys], stop, done=stop >= bounds.end, position=stop)

    def _keys(self, bounds: Bounds, cursor: int, limit: int) -> list[int]:
        if bounds.bucket is None:
            return list(range(cursor, min(bounds.end, cursor + limit)))
        keys: list[int] = []
        for index in range(cursor, bounds.end):
            if bounds.holds(self.params.record_key(index)):
                keys.append(index)
                if len(keys) == limit:
                    break
        return keys

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        record["checksum"] = hashlib.blake2b(record["payload"].encode(), digest_size=8).hexdigest()
        return record

    def _record(self, index: int) -> dict[str, Any]:
        return {"_id": self.params.record_key(index), "seq": index, "payload": self._filler}

    def failure_applies(self) -> bool:
        """Whether the injected failure at `fail_at_key` happens in this attempt (`fail_times`).
        A test variant overrides it (tests-e2e/flaky_source.py: a source broken, then fixed)."""
        return self.params.fail_times is None or self.context.attempt <= self.params.fail_times

    def _fail(self, key: int) -> None:
        kind = self.params.failure
        if kind == "crash":
            logger.warning("synthetic crash at key %d: killing this process", key)
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "retryable":
            raise RetryableError(f"synthetic transient failure at key {key} (attempt {self.context.attempt})")
        raise NonRetryableError(f"synthetic permanent failure at key {key}")
