"""The sink: stores a batch of cleaned records in the job's target collection by its write mode.

Every record carries its identity as `_id` and is stamped with Cairn's bookkeeping fields
(`cairn_contracts.sinks.BOOKKEEPING_FIELDS`): the job that last wrote it, when, the hash of its
content (upsert, replace_window) and for `replace_window` the window and the run that last saw it.
The modes:

- `insert` (the default): first write wins; a record already there (a re-run batch, a record
  another job stored) is not written again and is counted as a duplicate. No content hash is
  computed (about 9 µs a record): a later `upsert` rewrites such a record once.
- `upsert`: the latest version wins. A record whose content hash equals the stored one's is
  `unchanged` and not rewritten; a changed one is replaced whole (`updated`).
- `replace_window`: `upsert`, plus every record is stamped with the window and the run's start
  (`_cairn_run_ms`, the job's `created_at_ms`; an unchanged record gets only that stamp). When the
  job succeeds, the scheduler deletes the window's records no later run stamped
  (`cairn_contracts.sinks.stale_filter`) before the job's SUCCESS transition, so the delete is
  retried until it is done.

A batch is written with one `find` of the stored hashes and one unordered `bulk_write`; any
write error other than a duplicate key (a concurrent writer inserted the same record between the
two: counted as a duplicate, its version stands) raises BulkWriteError and fails the batch, which
is retried whole and, being idempotent, stores nothing twice.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

from bson import json_util
from pymongo import InsertOne, ReplaceOne, UpdateMany
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from cairn_contracts import clock
from cairn_contracts.sinks import (
    BATCH,
    BOOKKEEPING_FIELDS,
    CONTENT_HASH,
    INGESTED_AT,
    JOB_ID,
    OUTCOME,
    RUN_MS,
    WINDOW,
    WRITE_MODES,
    WriteMode,
)
from cairn_runtime.mongo import DUPLICATE_KEY, insert_new_sync


@dataclass(frozen=True)
class RunStamp:
    """Who writes: the job, its start (`run_ms`, epoch ms: orders runs of one window) and, for
    `replace_window`, the window it refreshes."""

    job_id: str
    run_ms: int = 0
    window: str | None = None
    batch: str | None = None  # `{shard_key}#{index}` of the batch being written; index = batches committed before it


@dataclass(frozen=True)
class WriteCounts:
    """What one write did with its records; each record is counted exactly once."""

    inserted: int = 0  # new identities
    updated: int = 0  # stored identities whose content changed: replaced
    unchanged: int = 0  # stored identities with the same content hash: not rewritten
    duplicate: int = 0  # not written: already there (insert), or superseded inside the batch / by a concurrent insert

    @property
    def written(self) -> int:
        """Documents written (inserted or replaced)."""
        return self.inserted + self.updated

    def __add__(self, other: "WriteCounts") -> "WriteCounts":
        return WriteCounts(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
            self.duplicate + other.duplicate,
        )

    def as_checkpoint_inc(self) -> dict[str, int]:
        """The checkpoint counters this write adds (`records_written`/`records_redone`: the
        names kept from before write modes: written = inserted + updated, redone = duplicate)."""
        return {
            "records_inserted": self.inserted,
            "records_updated": self.updated,
            "records_unchanged": self.unchanged,
            "records_duplicate": self.duplicate,
            "records_written": self.written,
            "records_redone": self.duplicate,
        }


class MissingIdentity(ValueError):
    """A record without `_id` reached an `upsert`/`replace_window` sink (a pipeline bug)."""


def content_hash(record: dict[str, Any]) -> str:
    """sha256 (hex) of the record's canonical extended JSON without the bookkeeping fields.

    Keys are sorted at every depth, so field order does not matter; types do (1 != 1.0 != "1"),
    and datetimes count to the millisecond (what MongoDB keeps)."""
    content = {name: value for name, value in record.items() if name not in BOOKKEEPING_FIELDS}
    canonical = json_util.dumps(content, sort_keys=True, separators=(",", ":"), json_options=json_util.CANONICAL_JSON_OPTIONS)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_records(target: Collection, records: list[dict[str, Any]], *, mode: WriteMode, run: RunStamp) -> WriteCounts:
    """Store `records` (stamped in place) in `target` by `mode`; see the module docstring.

    Raises `MissingIdentity` (upsert/replace_window: a record has no `_id`), ValueError (an
    unknown mode or a replace_window run without a window) and BulkWriteError for any write
    error other than a duplicate key."""
    if not records:
        return WriteCounts()
    ingested_at = clock.utcnow()
    hashed = mode != "insert"  # insert never compares content: it keeps today's cost (no hash)
    for record in records:
        if hashed:
            record[CONTENT_HASH] = content_hash(record)
        record[JOB_ID] = run.job_id
        record[INGESTED_AT] = ingested_at
    if mode == "insert":
        inserted = insert_new_sync(target, records)
        return WriteCounts(inserted=inserted.written, duplicate=inserted.duplicates)
    if mode == "upsert":
        return _upsert(target, records, run, window=False)
    if mode == "replace_window":
        if run.window is None:
            raise ValueError("replace_window needs the run's window")
        return _upsert(target, records, run, window=True)
    raise ValueError(f"unknown write mode {mode!r}; one of {', '.join(WRITE_MODES)}")


def insert_groups(target: Collection, groups: list[list[dict[str, Any]]], *, run: RunStamp) -> list[WriteCounts | BulkWriteError]:
    """The `insert` mode for several batches at once (a bundle's shards, one batch each): one
    unordered `insert_many` of every group's records (stamped in place as `write_records` does).
    Returns, per group, its counts (duplicate keys attributed to it by index), or a
    BulkWriteError with that group's own errors when any of them is not a duplicate key (what
    `write_records` raises for that batch alone; the other groups are counted as written)."""
    documents = [record for group in groups for record in group]
    ingested_at = clock.utcnow()
    for record in documents:
        record[JOB_ID] = run.job_id
        record[INGESTED_AT] = ingested_at
    errors: dict[int, dict[str, Any]] = {}
    if documents:
        try:
            target.insert_many(documents, ordered=False)
        except BulkWriteError as error:
            errors = {int(e["index"]): e for e in error.details.get("writeErrors", [])}
    results: list[WriteCounts | BulkWriteError] = []
    first = 0
    for group in groups:
        own = [errors[index] for index in range(first, first + len(group)) if index in errors]
        first += len(group)
        if any(e.get("code") != DUPLICATE_KEY for e in own):
            results.append(BulkWriteError({"writeErrors": own, "nInserted": len(group) - len(own)}))
        else:
            results.append(WriteCounts(inserted=len(group) - len(own), duplicate=len(own)))
    return results


def _upsert(target: Collection, records: list[dict[str, Any]], run: RunStamp, *, window: bool) -> WriteCounts:
    latest: dict[Any, dict[str, Any]] = {}
    for record in records:
        if "_id" not in record:
            raise MissingIdentity("every record needs its identity as `_id` to be upserted")
        latest[record["_id"]] = record  # a later version of the same identity in one batch wins
        if window:
            record[WINDOW] = run.window
            record[RUN_MS] = run.run_ms
    superseded = len(records) - len(latest)
    stored = {
        document["_id"]: document
        for document in target.find({"_id": {"$in": list(latest)}}, {CONTENT_HASH: 1, JOB_ID: 1, BATCH: 1, OUTCOME: 1})
    }
    inserts: list[InsertOne] = []
    replaces: list[ReplaceOne] = []
    unchanged: list[Any] = []
    rewritten = {"inserted": 0, "updated": 0}  # this batch's own lost write, found again (see below)
    for identity, record in latest.items():
        if run.batch is not None:
            record[BATCH] = run.batch
        before = stored.get(identity)
        if before is None:
            record[OUTCOME] = "inserted"
            inserts.append(InsertOne(record))
        elif before.get(CONTENT_HASH) != record[CONTENT_HASH]:
            record[OUTCOME] = "updated"
            # upsert=True: the stored one may be gone since the find (a replace_window delete).
            replaces.append(ReplaceOne({"_id": identity}, record, upsert=True))
        elif _own_lost_write(before, run):
            # Written by this very batch in a run that died (or was fenced) before committing it:
            # that write was never counted, so it is counted now, as what it was.
            rewritten[before[OUTCOME]] += 1
        else:
            unchanged.append(identity)
    operations: list[Any] = [*inserts, *replaces]
    if window and unchanged:
        # Not rewritten, only claimed for this window and run: `$max`, so an older run that is
        # still writing never lowers a newer run's stamp (which would let it delete the record).
        operations.append(UpdateMany({"_id": {"$in": unchanged}}, {"$set": {WINDOW: run.window}, "$max": {RUN_MS: run.run_ms}}))
    raced_inserts = raced_replaces = 0
    if operations:
        try:
            target.bulk_write(operations, ordered=False)
        except BulkWriteError as error:
            write_errors = error.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in write_errors):
                raise
            # Another writer stored the identity between the find and this write (an insert, or
            # the upsert of a record deleted meanwhile): its version stands, this one is a duplicate.
            raced_inserts = sum(1 for e in write_errors if int(e.get("index", 0)) < len(inserts))
            raced_replaces = len(write_errors) - raced_inserts
    return WriteCounts(
        inserted=len(inserts) - raced_inserts + rewritten["inserted"],
        updated=len(replaces) - raced_replaces + rewritten["updated"],
        unchanged=len(unchanged),
        duplicate=superseded + raced_inserts + raced_replaces,
    )


def _own_lost_write(stored: dict[str, Any], run: RunStamp) -> bool:
    """Whether the stored record was written by the batch `run` is writing now (same job, same
    `{shard_key}#{index}`): only a batch whose commit never happened is ever written again with
    the same index, because a committed batch moves the checkpoint past it."""
    return (
        run.batch is not None
        and stored.get(BATCH) == run.batch
        and stored.get(JOB_ID) == run.job_id
        and stored.get(OUTCOME) in ("inserted", "updated")
    )
