"""The registry of pipelines, by the names the contracts allow (`cairn_contracts.pipelines`).

Each entry is a pipeline class with `from_job(params, *, attempt, source, bucket)` (params as
stored in the job spec, validated by the class) and a `failures: FailurePolicy` class attribute.
`register_pipeline` replaces an entry: the test suite registers a test variant of `synthetic`
in its worker processes this way (`CAIRN_TEST_PIPELINE_MODULE`, see bootstrap.py).
"""

import logging
from typing import Any, Protocol

from pymongo.database import Database

from cairn_contracts.pipelines import MONGO_RANGE, PIPELINE_NAMES, SYNTHETIC
from cairn_ingest_worker.errors import FailurePolicy
from cairn_ingest_worker.pipelines.base import Batch, Bucket, Pipeline
from cairn_ingest_worker.pipelines.mongo_range import MongoRangePipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline

__all__ = ["Batch", "Bucket", "Pipeline", "PipelineClass", "build_pipeline", "failure_policy", "register_pipeline"]

logger = logging.getLogger(__name__)


class PipelineClass(Protocol):
    """A pipeline class as the registry holds it (the class object itself, not an instance)."""

    @property
    def failures(self) -> FailurePolicy: ...

    def from_job(self, params: dict[str, Any], *, attempt: int, source: Database, bucket: Bucket | None) -> Pipeline: ...


_PIPELINES: dict[str, PipelineClass] = {SYNTHETIC: SyntheticPipeline, MONGO_RANGE: MongoRangePipeline}


def register_pipeline(name: str, pipeline: PipelineClass) -> None:
    """Run jobs naming `name` with `pipeline`. Raises ValueError for a name the contracts do not
    allow (the gateway accepts no job naming it)."""
    if name not in PIPELINE_NAMES:
        raise ValueError(f"no pipeline named {name!r} in the contracts")
    logger.warning("pipeline %r is run by %s.%s", name, getattr(pipeline, "__module__", "?"), getattr(pipeline, "__qualname__", pipeline))
    _PIPELINES[name] = pipeline


def failure_policy(name: str) -> FailurePolicy:
    """What the pipeline named `name` declares about its failures (the defaults if unknown)."""
    declared = getattr(_PIPELINES.get(name), "failures", None)
    return declared if isinstance(declared, FailurePolicy) else FailurePolicy()


def build_pipeline(name: str, params: dict, *, attempt: int, source: Database, bucket: Bucket | None = None) -> Pipeline:
    """The pipeline named `name` for one shard run. Raises ValueError for an unknown name and
    pydantic's ValidationError for params its class refuses."""
    pipeline = _PIPELINES.get(name)
    if pipeline is None:
        raise ValueError(f"no pipeline named {name!r}")
    return pipeline.from_job(params, attempt=attempt, source=source, bucket=bucket)
