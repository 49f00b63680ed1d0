"""TEST ONLY: the synthetic pipeline with a source that a test fixes while its job waits.

Not part of Cairn: the end-to-end harness loads it into every worker process it starts
(`CAIRN_TEST_PIPELINE_MODULE=flaky_source`, tests-e2e on PYTHONPATH), where importing it
registers `FlakySyntheticPipeline` under the public name `synthetic` (`register_pipeline`). Jobs
keep the public parameters: the injected failure at `fail_at_key` happens as in production
(within `fail_times`) until the test marks the job's source fixed, by its `key_prefix`, with a
document `{_id: <key_prefix>}` in the `fixed_sources` collection of the worker's source database
(Cairn's by default). A job whose prefix is never marked runs exactly as in production.
A marked source is also no longer slow: `delay_ms_per_record` applies until the mark (the worker
control tests stop a run stuck in a long batch, then let the rerun go fast).
"""

from typing import Any

from pymongo.collection import Collection
from pymongo.database import Database

from cairn_contracts.pipelines import SYNTHETIC, SyntheticParams
from cairn_ingest_worker.pipelines import Batch, Bucket, register_pipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline

FIXED_SOURCES = "fixed_sources"


class FlakySyntheticPipeline(SyntheticPipeline):
    def __init__(self, params: SyntheticParams, attempt: int, bucket: Bucket | None, fixed_sources: Collection) -> None:
        super().__init__(params, attempt, bucket)
        self._fixed_sources = fixed_sources

    @classmethod
    def from_job(cls, params: dict[str, Any], *, attempt: int, source: Database, bucket: Bucket | None) -> "FlakySyntheticPipeline":
        return cls(SyntheticParams.model_validate(params), attempt, bucket, source[FIXED_SOURCES])

    def failure_applies(self) -> bool:
        return not self._fixed() and super().failure_applies()

    def read(self, cursor: int, end: int, limit: int) -> Batch:
        if self._params.delay_ms_per_record and self._fixed():
            self._params = self._params.model_copy(update={"delay_ms_per_record": 0})
        return super().read(cursor, end, limit)

    def _fixed(self) -> bool:
        return self._fixed_sources.find_one({"_id": self._params.key_prefix}, {"_id": 1}) is not None


register_pipeline(SYNTHETIC, FlakySyntheticPipeline)
