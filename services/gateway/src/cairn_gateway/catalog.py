"""The pipeline catalog as the gateway reads it: the `pipelines` collection the workers announce to.

The gateway never imports pipeline code: a job is checked against its pipeline's announced
params JSON Schema and work-space descriptors (cairn_contracts.pipelines.check_job), and the
resolved work space is kept on the job document for the scheduler.
"""

import logging
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.jobs import JobSpec
from cairn_contracts.pipelines import PIPELINES, BrokenEntry, CatalogEntry, CatalogRefusal, check_job, unknown_pipeline
from cairn_gateway.errors import Invalid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedJob:
    """What the catalog says of an accepted job: its pipeline's version, and its work space
    (`{kind, <fields>, start, end}`)."""

    version: str
    space: dict[str, Any] | None  # None: decided when the job is released (its params come from `params_from`)


async def catalog_entries(db: AsyncDatabase) -> list[CatalogEntry]:
    """Every announced pipeline, by name (an unreadable entry is left out, see `_entry`)."""
    entries = [_entry(document) async for document in db[PIPELINES].find({}).sort("_id", 1)]
    return [entry for entry in entries if entry is not None]


async def catalog_entry(db: AsyncDatabase, name: str) -> CatalogEntry | None:
    """The announced pipeline `name`; None if none is, or its entry is unreadable."""
    document = await db[PIPELINES].find_one({"_id": name})
    return _entry(document) if document is not None else None


def _entry(document: dict[str, Any]) -> CatalogEntry | None:
    # The catalog is written by whatever runs as a worker: a broken document is that pipeline not
    # announced (a 422 or 404 for it), never a 500 for every caller of the catalog.
    try:
        return CatalogEntry.from_document(document)
    except BrokenEntry as error:
        logger.warning("%s: left out of the catalog", error)
        return None


async def check_spec(db: AsyncDatabase, spec: JobSpec, at: tuple[str | int, ...] = ("body",)) -> CheckedJob:
    """The job checked against the catalog. Raises `Invalid` (422) naming the field: an
    unannounced pipeline (["body", "pipeline"], listing the announced ones), params the schema
    refuses (["body", "params", <field>...]), an empty work space, a plan too large
    (["body", "sharding", "item_size"]). `at`: where the spec is in the request body.

    A spec with `params_from` has params that are not known yet: only its pipeline is checked
    here, the rest by the scheduler when the job is released (a refusal then fails the job)."""
    entry = await catalog_entry(db, spec.pipeline)
    try:
        if entry is None:
            raise unknown_pipeline(spec.pipeline, [e.name for e in await catalog_entries(db)], at)
        if spec.params_from:
            return CheckedJob(entry.version, None)
        space = check_job(entry, spec.params, spec.sharding, at)
    except CatalogRefusal as refusal:
        raise Invalid.of(refusal.errors) from None
    return CheckedJob(entry.version, space)


@dataclass(frozen=True)
class PipelineCatalog:
    """The catalog for `GET /v1/pipelines`."""

    db: AsyncDatabase

    async def list(self) -> list[CatalogEntry]:
        return await catalog_entries(self.db)

    async def get(self, name: str) -> CatalogEntry | None:
        return await catalog_entry(self.db, name)
