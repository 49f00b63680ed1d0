"""Write modes of a job's sink and the bookkeeping fields Cairn keeps on stored records.

Shared by the worker (which writes records, `cairn_ingest_worker.store`), the scheduler (which
deletes a `replace_window` job's stale records before the job's SUCCESS) and the gateway (which
sums the write counters). See README "Write modes" and docs/design.md "Sinks".
"""

import hashlib
import json
from typing import Any, Literal

WriteMode = Literal["insert", "upsert", "replace_window"]
WRITE_MODES: tuple[WriteMode, ...] = ("insert", "upsert", "replace_window")

# Cairn's bookkeeping on a stored record: left out of the content hash (re-stamping a record does
# not change its content). `job_id`/`ingested_at` are the last writing job and its write time.
JOB_ID = "job_id"
INGESTED_AT = "ingested_at"
CONTENT_HASH = "_cairn_hash"
WINDOW = "_cairn_window"
RUN_MS = "_cairn_run_ms"
# upsert/replace_window: the batch that last wrote the record (`{shard_key}#{batch index}`) and
# what that write was (inserted/updated): a batch redone after a crash recognises its own lost
# write and counts it as that write did, so counters stay exact (see the worker's store.py).
BATCH = "_cairn_batch"
OUTCOME = "_cairn_outcome"
BOOKKEEPING_FIELDS = frozenset({JOB_ID, INGESTED_AT, CONTENT_HASH, WINDOW, RUN_MS, BATCH, OUTCOME})

# The write counters a checkpoint accumulates (one `$inc` per committed batch) and a job's result
# and status sum over its checkpoints. `records_written` (inserted + updated) and `records_redone`
# (= records_duplicate) are the names from before write modes, kept with the same meaning.
WRITE_COUNTERS = ("records_inserted", "records_updated", "records_unchanged", "records_duplicate")


def window_key(spec: dict[str, Any]) -> str:
    """The scope a `replace_window` job refreshes, from its stored spec (a dict): the spec's
    `window` if set, else `{pipeline}:{sha256(canonical params)[:16]}`: the same pipeline with
    the same params refreshes the same window (a schedule's runs; a re-submitted job)."""
    if spec.get("window"):
        return str(spec["window"])
    params = json.dumps(spec.get("params", {}), sort_keys=True, separators=(",", ":"), default=str)
    return f"{spec['pipeline']}:{hashlib.sha256(params.encode()).hexdigest()[:16]}"


def stale_filter(window: str, run_ms: int) -> dict[str, Any]:
    """The records of `window` that no run started at or after `run_ms` wrote or re-stamped:
    what a `replace_window` run started at `run_ms` deletes once it succeeded."""
    return {WINDOW: window, RUN_MS: {"$lt": run_ms}}

# Every counter of a checkpoint that a job's result sums (the scheduler's roll-up).
CHECKPOINT_COUNTERS = ("records_done", "records_written", "records_redone", *WRITE_COUNTERS, "batches")
