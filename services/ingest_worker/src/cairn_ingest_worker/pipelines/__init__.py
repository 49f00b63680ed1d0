"""The pipelines this worker runs: every `cairn.pipelines` entry point of the installed packages.

Each entry point is `name = "module:Class"`, the class a `cairn_sdk.Pipeline` whose `name` is the
entry point's name (the built-ins, synthetic and mongo_range, are registered by this package's
own pyproject the same way). A plug-in that fails to import, or is no Pipeline, is logged and
left out: one broken package must not stop the worker running the others.

`register_pipeline` replaces or adds an entry in this process: the test suite registers a test
variant of `synthetic` in its worker processes this way (`CAIRN_TEST_PIPELINE_MODULE`, see
bootstrap.py).
"""

import logging
import re
from importlib.metadata import entry_points
from typing import Any

from cairn_contracts.jobs import PIPELINE_NAME
from cairn_sdk import ENTRY_POINT_GROUP, FailurePolicy, Pipeline, RunContext

__all__ = ["build_pipeline", "catalog", "discover", "failure_policy", "pipelines", "register_pipeline"]

logger = logging.getLogger(__name__)

PipelineClass = type[Pipeline[Any]]

_discovered: dict[str, PipelineClass] | None = None
_registered: dict[str, PipelineClass] = {}


def discover(group: str = ENTRY_POINT_GROUP) -> dict[str, PipelineClass]:
    """The pipeline classes of the installed packages' entry points in `group`, by name."""
    found: dict[str, PipelineClass] = {}
    for entry in entry_points(group=group):
        try:
            loaded = entry.load()
        except Exception:
            logger.exception("pipeline entry point %s = %s failed to import; left out", entry.name, entry.value)
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Pipeline)):
            logger.error("pipeline entry point %s = %s is not a cairn_sdk.Pipeline; left out", entry.name, entry.value)
            continue
        if getattr(loaded, "name", None) != entry.name or not re.fullmatch(PIPELINE_NAME, entry.name):
            logger.error("pipeline entry point %s names class %s with name %r; left out", entry.name, entry.value, getattr(loaded, "name", None))
            continue
        found[entry.name] = loaded
    return found


def pipelines() -> dict[str, PipelineClass]:
    """Every pipeline this process runs, by name (discovered once, then the registered ones)."""
    global _discovered
    if _discovered is None:
        _discovered = discover()
        logger.info("pipelines discovered: %s", ", ".join(sorted(_discovered)) or "none")
    return {**_discovered, **_registered}


def register_pipeline(name: str, pipeline: PipelineClass) -> None:
    """Run jobs naming `name` with `pipeline` in this process. Raises ValueError for a name that
    is no pipeline name, or a class that is not a cairn_sdk.Pipeline named `name`."""
    if not re.fullmatch(PIPELINE_NAME, name) or not (isinstance(pipeline, type) and issubclass(pipeline, Pipeline)) or pipeline.name != name:
        raise ValueError(f"register_pipeline({name!r}, ...) needs a cairn_sdk.Pipeline subclass whose name is {name!r}")
    logger.warning("pipeline %r is run by %s.%s", name, pipeline.__module__, pipeline.__qualname__)
    _registered[name] = pipeline


def catalog() -> list[dict[str, Any]]:
    """The catalog entries of every pipeline (name, version, description, params_schema, space)."""
    return [cls.catalog_entry() for _, cls in sorted(pipelines().items())]


def failure_policy(name: str) -> FailurePolicy:
    """What the pipeline named `name` declares about its failures (the defaults if unknown)."""
    declared = getattr(pipelines().get(name), "failures", None)
    return declared if isinstance(declared, FailurePolicy) else FailurePolicy()


def build_pipeline(name: str, params: dict[str, Any], context: RunContext) -> Pipeline[Any]:
    """The pipeline named `name` for one shard run. Raises LookupError for a name this worker
    does not run and pydantic's ValidationError for params its class refuses."""
    pipeline = pipelines().get(name)
    if pipeline is None:
        raise LookupError(f"this worker runs no pipeline named {name!r} (it runs: {', '.join(sorted(pipelines()))})")
    return pipeline(pipeline.Params.model_validate(params), context)
