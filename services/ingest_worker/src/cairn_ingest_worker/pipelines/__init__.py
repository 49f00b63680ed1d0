"""The registry of pipelines, by the names the contracts allow."""

from pymongo.database import Database

from cairn_contracts.pipelines import MONGO_RANGE, SYNTHETIC, MongoRangeParams, SyntheticParams
from cairn_ingest_worker.pipelines.base import Batch, Pipeline
from cairn_ingest_worker.pipelines.mongo_range import MongoRangePipeline
from cairn_ingest_worker.pipelines.synthetic import SyntheticPipeline

__all__ = ["Batch", "Pipeline", "build_pipeline"]


def build_pipeline(name: str, params: dict, *, attempt: int, source: Database) -> Pipeline:
    if name == SYNTHETIC:
        return SyntheticPipeline(SyntheticParams.model_validate(params), attempt)
    if name == MONGO_RANGE:
        return MongoRangePipeline(MongoRangeParams.model_validate(params), source)
    raise ValueError(f"no pipeline named {name!r}")
