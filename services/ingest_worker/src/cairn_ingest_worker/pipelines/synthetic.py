"""Deterministic generated records, with knobs for size, slowness and injected failures."""

import hashlib
import logging
import os
import signal
import time
from typing import Any, ClassVar

from pymongo.database import Database

from cairn_contracts.pipelines import SyntheticParams
from cairn_ingest_worker.errors import FailurePolicy, NonRetryableError, RetryableError
from cairn_ingest_worker.pipelines.base import Batch, Bucket

logger = logging.getLogger(__name__)


class SyntheticPipeline:
    failures: ClassVar[FailurePolicy] = FailurePolicy()  # the defaults: RetryableError / NonRetryableError

    def __init__(self, params: SyntheticParams, attempt: int, bucket: Bucket | None = None) -> None:
        self._params = params
        self._attempt = attempt
        self._bucket = bucket
        self._filler = ("cairn" * (params.record_size // 5 + 1))[: params.record_size]

    @classmethod
    def from_job(cls, params: dict[str, Any], *, attempt: int, source: Database, bucket: Bucket | None) -> "SyntheticPipeline":
        return cls(SyntheticParams.model_validate(params), attempt, bucket)

    def read(self, cursor: int, end: int, limit: int) -> Batch:
        keys = self._keys(cursor, end, limit)
        stop = keys[-1] + 1 if keys else end
        fail_at = self._params.fail_at_key
        if fail_at is not None and fail_at in keys and self.failure_applies():
            self._fail(fail_at)
        if self._params.delay_ms_per_record:
            time.sleep(self._params.delay_ms_per_record * len(keys) / 1000)
        return Batch([self._record(i) for i in keys], stop)

    def _keys(self, cursor: int, end: int, limit: int) -> list[int]:
        if self._bucket is None:
            return list(range(cursor, min(end, cursor + limit)))
        keys: list[int] = []
        for index in range(cursor, end):
            if self._bucket.holds(self._params.record_key(index)):
                keys.append(index)
                if len(keys) == limit:
                    break
        return keys

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        record["checksum"] = hashlib.blake2b(record["payload"].encode(), digest_size=8).hexdigest()
        return record

    def _record(self, index: int) -> dict[str, Any]:
        return {"_id": self._params.record_key(index), "seq": index, "payload": self._filler}

    def failure_applies(self) -> bool:
        """Whether the injected failure at `fail_at_key` happens in this attempt (`fail_times`).
        A test variant overrides it (tests-e2e/flaky_source.py: a source broken, then fixed)."""
        return self._params.fail_times is None or self._attempt <= self._params.fail_times

    def _fail(self, key: int) -> None:
        kind = self._params.failure
        if kind == "crash":
            logger.warning("synthetic crash at key %d: killing this process", key)
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "retryable":
            raise RetryableError(f"synthetic transient failure at key {key} (attempt {self._attempt})")
        raise NonRetryableError(f"synthetic permanent failure at key {key}")
