"""The worker's announcement of its pipeline catalog to the store, at start-up.

One `pipelines` document per pipeline (`_id` = its name): inserted if new, else replaced whole.
No upsert: the MongoDB stand-in drops `$setOnInsert` (docs/mongodb-stand-in.md), and a plain
insert-then-replace gives the same end state on any server, however often it runs. Workers of
different versions of a pipeline overwrite each other's entry: the last one started wins
(`announced_by` says which), so roll a new version out to every worker.
"""

import logging
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.pipelines import catalog_document

logger = logging.getLogger(__name__)


def announce_catalog(pipelines: Collection, entries: list[dict[str, Any]], announced_by: str) -> int:
    """Write each catalog entry (cairn_sdk `Pipeline.catalog_entry()`) to `pipelines`; returns how
    many. Raises pymongo errors (ConnectionFailure when the store is away)."""
    now_ms = clock.now_ms()
    for entry in entries:
        document = catalog_document(entry, announced_by, now_ms)
        try:
            pipelines.insert_one({"_id": entry["name"], **document})
        except DuplicateKeyError:
            pipelines.replace_one({"_id": entry["name"]}, document)
        logger.info("pipeline %s (version %s) announced", entry["name"], entry["version"])
    return len(entries)
