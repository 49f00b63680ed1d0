"""Deterministic generated records, with knobs for size, slowness and injected failures."""

import hashlib
import logging
import os
import signal
import time
from typing import Any

from cairn_contracts.pipelines import SyntheticParams
from cairn_ingest_worker.errors import NonRetryableError, RetryableError
from cairn_ingest_worker.pipelines.base import Batch

logger = logging.getLogger(__name__)


class SyntheticPipeline:
    def __init__(self, params: SyntheticParams, attempt: int) -> None:
        self._params = params
        self._attempt = attempt
        self._filler = ("cairn" * (params.record_size // 5 + 1))[: params.record_size]

    def read(self, cursor: int, end: int, limit: int) -> Batch:
        stop = min(end, cursor + limit)
        fail_at = self._params.fail_at_key
        if fail_at is not None and cursor <= fail_at < stop and self._failure_applies():
            self._fail(fail_at)
        if self._params.delay_ms_per_record:
            time.sleep(self._params.delay_ms_per_record * (stop - cursor) / 1000)
        return Batch([self._record(i) for i in range(cursor, stop)], stop)

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        record["checksum"] = hashlib.blake2b(record["payload"].encode(), digest_size=8).hexdigest()
        return record

    def _record(self, index: int) -> dict[str, Any]:
        return {"_id": self._params.record_key(index), "seq": index, "payload": self._filler}

    def _failure_applies(self) -> bool:
        return self._params.fail_times is None or self._attempt <= self._params.fail_times

    def _fail(self, key: int) -> None:
        kind = self._params.failure
        if kind == "crash":
            logger.warning("synthetic crash at key %d: killing this process", key)
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "retryable":
            raise RetryableError(f"synthetic transient failure at key {key} (attempt {self._attempt})")
        raise NonRetryableError(f"synthetic permanent failure at key {key}")
