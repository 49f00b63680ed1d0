"""Stores cleaned records exactly once: each has a unique `_id`, and an insert of a record that
is already there (a re-run batch) is counted as a duplicate, not written again."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class StoreResult:
    written: int
    duplicates: int


def store_records(target: Collection, records: list[dict[str, Any]], job_id: str) -> StoreResult:
    if not records:
        return StoreResult(0, 0)
    ingested_at = datetime.now(UTC)
    for record in records:
        record["job_id"] = job_id
        record["ingested_at"] = ingested_at
    try:
        result = target.insert_many(records, ordered=False)
        return StoreResult(len(result.inserted_ids), 0)
    except BulkWriteError as error:
        write_errors = error.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY for e in write_errors):
            raise
        return StoreResult(error.details.get("nInserted", 0), len(write_errors))
