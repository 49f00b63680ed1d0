"""The registry of pipelines, by the names the contracts allow."""

from pymongo.database import Database

from cairn_contracts.pipelines import MONGO_RANGE, SYNTHETIC, MongoRangeParams, SyntheticParams
from cairn_contracts.store import FAULT_FLAGS
from cairn_ingest_worker.errors import FailurePolicy
from cairn_ingest_worker.pipelines.base import Batch, Bucket, Pipeline
from cairn_ingest_worker.pipelines.mongo_range import MongoRangePipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline

__all__ = ["Batch", "Bucket", "Pipeline", "build_pipeline", "failure_policy"]

_CLASSES: dict[str, type] = {SYNTHETIC: SyntheticPipeline, MONGO_RANGE: MongoRangePipeline}


def failure_policy(name: str) -> FailurePolicy:
    """What the pipeline named `name` declares about its failures (the defaults if unknown)."""
    declared = getattr(_CLASSES.get(name), "failures", None)
    return declared if isinstance(declared, FailurePolicy) else FailurePolicy()


def build_pipeline(name: str, params: dict, *, attempt: int, source: Database, bucket: Bucket | None = None) -> Pipeline:
    if name == SYNTHETIC:
        # Fault flags (test scaffolding) live beside the sources: Cairn's database by default.
        return SyntheticPipeline(SyntheticParams.model_validate(params), attempt, bucket, source[FAULT_FLAGS])
    if name == MONGO_RANGE:
        return MongoRangePipeline(MongoRangeParams.model_validate(params), source, bucket)
    raise ValueError(f"no pipeline named {name!r}")
