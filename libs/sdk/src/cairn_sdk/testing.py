"""Run a pipeline in-process, without Cairn: for a pipeline package's own unit tests."""

from typing import Any

from cairn_sdk.pipeline import Bounds, Pipeline, RunContext
from cairn_sdk.space import resolve


def bounds_of(pipeline_class: type[Pipeline[Any]], params: dict[str, Any]) -> Bounds:
    """The whole interval a job with these params (JSON form) covers, as one shard's Bounds."""
    schema = pipeline_class.Params.model_json_schema()
    defaults = {name: prop["default"] for name, prop in schema.get("properties", {}).items() if "default" in prop}
    interval = resolve(pipeline_class.catalog_entry()["space"], {**defaults, **params})
    items = None
    if interval.space["kind"] == "work_items":
        items = tuple(params[interval.space["field"]][interval.start : interval.end])
    return Bounds(interval.start, interval.end, items=items)


def drain(
    pipeline_class: type[Pipeline[Any]],
    params: dict[str, Any],
    *,
    context: RunContext | None = None,
    bounds: Bounds | None = None,
    limit: int = 100,
    max_batches: int = 100_000,
) -> list[dict[str, Any]]:
    """Every record the pipeline stores for `params` (cleaned, `_id` = identity), read batch by
    batch as the runner does. Raises RuntimeError past `max_batches` (a cursor that never ends).
    The default context lets the pipeline reach private networks: a test's fake API listens on loopback."""
    pipeline = pipeline_class(pipeline_class.Params.model_validate(params), context or RunContext(allow_private_networks=True))
    bounds = bounds or bounds_of(pipeline_class, params)
    try:
        cursor = pipeline.start(bounds)
        stored: list[dict[str, Any]] = []
        for _ in range(max_batches):
            batch = pipeline.read(bounds, cursor, limit)
            for record in batch.records:
                cleaned = pipeline.clean(record)
                if cleaned is not None:
                    stored.append({**cleaned, "_id": pipeline.identity(cleaned)})
            if batch.done:
                return stored
            cursor = batch.cursor
        raise RuntimeError(f"{pipeline_class.name}: not done after {max_batches} batches")
    finally:
        pipeline.close()
