"""TEST ONLY: the synthetic pipeline with a source that a test fixes while its job waits.

Not part of Cairn: the end-to-end harness loads it into every worker process it starts
(`CAIRN_TEST_PIPELINE_MODULE=flaky_source`, tests-e2e on PYTHONPATH), where importing it
registers `FlakySyntheticPipeline` under the public name `synthetic` (`register_pipeline`). Jobs
keep the public parameters: the injected failure at `fail_at_key` happens as in production
(within `fail_times`) until the test marks the job's source fixed, by its `key_prefix`, with a
document `{_id: <key_prefix>}` in the `fixed_sources` collection of the job's source database
(its tenant's namespace). A job whose prefix is never marked runs exactly as in production.
A marked source is also no longer slow: `delay_ms_per_record` applies until the mark (the worker
control tests stop a run stuck in a long batch, then let the rerun go fast).
"""

from typing import Any

from cairn_ingest_worker.pipelines import register_pipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline
from cairn_sdk import Batch, Bounds

FIXED_SOURCES = "fixed_sources"


class FlakySyntheticPipeline(SyntheticPipeline):
    def failure_applies(self) -> bool:
        return not self._fixed() and super().failure_applies()

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        if self.params.delay_ms_per_record and self._fixed():
            self.params = self.params.model_copy(update={"delay_ms_per_record": 0})
        return super().read(bounds, cursor, limit)

    def _fixed(self) -> bool:
        return self.context.source()[FIXED_SOURCES].find_one({"_id": self.params.key_prefix}, {"_id": 1}) is not None


register_pipeline(SyntheticPipeline.name, FlakySyntheticPipeline)
