"""Stores cleaned records exactly once: each has a unique `_id`, and an insert of a record that
is already there (a re-run batch) is counted as a duplicate, not written again."""

from typing import Any

from pymongo.collection import Collection

from cairn_contracts import clock
from cairn_runtime.mongo import Inserted, insert_new_sync


def store_records(target: Collection, records: list[dict[str, Any]], job_id: str) -> Inserted:
    """Stamp the records with `job_id` and `ingested_at` (in place) and insert those not there yet.
    Raises BulkWriteError for any write error other than a duplicate key."""
    if not records:
        return Inserted(0, 0)
    ingested_at = clock.utcnow()
    for record in records:
        record["job_id"] = job_id
        record["ingested_at"] = ingested_at
    return insert_new_sync(target, records)
