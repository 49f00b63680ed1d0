"""A job's counters, kept up to date shard by shard: each terminal shard is added exactly once.

The job document carries the counters (`counts`): the status and the roll-up read that one
document. What each shard contributed is kept in a ledger beside it, in buckets of
`BUCKET_SHARDS` consecutive shards: one `job_tallies` document per bucket,
`{_id: "<job>/<bucket>", job_id, bucket, entries: {s<index>: entry}, counts, seq}`, where an entry
is `"<state>|<the checkpoint's counters, TOTALS order>|<weight>"`, `counts` the
bucket's sum of its entries and `seq` how many times the bucket changed. Counting a shard is:

1. one conditional update of its bucket: compare-and-set of the shard's entry together with the
   `$inc` of the difference and of `seq`, so entries and counters never disagree (no transaction,
   no crash window between "marked" and "added");
2. one conditional update of the job applying the bucket's new state: the job keeps, per bucket,
   the snapshot (`ledger.b<bucket>`: `"<seq>|<counters>"`) its `counts` include; the update swaps
   the snapshot the bucket had before for the one after and adds their difference, so the job's
   counters are always the sum of the bucket snapshots it holds.

Any writer can bring a job up to its buckets (`_catch_up`): a job whose apply was lost (a crash
between 1 and 2, a writer that applied a later snapshot first) is caught up by the next count in
that bucket, a duplicate event, or the reconcile pass (`uncounted`). Hence:

- a duplicate ShardFinished, a second scheduler, the periodic reconcile: the entry already says
  what the shard says, nothing is added;
- a crash before step 1: the shard is terminal but absent from the ledger, and the next event or
  the reconcile pass adds it;
- a FAILED shard reopened by a DLQ replay is taken back out (its entry removed, its figures
  subtracted), and counted again when it ends;
- a finished job's counters are final: step 2 requires the job not final (a DLQ replay reopens it
  first, and the apply after that brings in what its buckets recorded meanwhile).

Why buckets: a ledger inside the job document grew by ~40 bytes per ended shard and was read and
rewritten whole on every count and every status read (at 4,096 items: ~160 KB per command). A
bucket stays under ~5 KB, the job's snapshots under ~100 bytes per bucket.

`count_many` counts a batch of shards with one read of the shards and two writes per bucket (every
entry of the bucket set at once, on the condition that none of them was there), falling back to
the shard-by-shard compare-and-set whenever that condition fails. `weight` is a succeeded shard's
`records_estimate` (0 for a failed or cancelled one): the share of the job's progress it stands
for. A job counted by an older Cairn (entries `tally.s<index>` in the job document) is moved to
buckets by `migrate_legacy_ledgers` when a scheduler or DLQ handler starts.
"""

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts.sinks import CHECKPOINT_COUNTERS
from cairn_contracts.states import TERMINAL_JOB_STATES, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, JOB_TALLIES, JOBS, SHARDS, checkpoint_id

logger = logging.getLogger(__name__)

COUNTS = "counts"  # job (and bucket) field: the counters below
LEDGER = "ledger"  # job field: bucket -> the snapshot of it COUNTS include (`b<bucket>`: "<seq>|<counters>")
LEGACY_LEDGER = "tally"  # job field of an older Cairn: shard index -> its entry (`migrate_legacy_ledgers`)
ENTRIES = "entries"  # bucket field: shard index -> what it contributed to COUNTS
SEQ = "seq"  # bucket field: how many times it changed
TOTALS = CHECKPOINT_COUNTERS  # a checkpoint's counters (cairn_contracts.sinks), summed per job
SHARD_COUNTERS = {
    ShardState.SUCCEEDED: "shards_succeeded",
    ShardState.FAILED: "shards_failed",
    ShardState.CANCELLED: "shards_cancelled",
}
WEIGHT_DONE = "weight_done"  # sum of the succeeded shards' records_estimate
COUNTER_FIELDS = (*SHARD_COUNTERS.values(), *TOTALS, WEIGHT_DONE)
BUCKET_SHARDS = 128  # consecutive shards per ledger bucket: ~5 KB of entries at most
_FINAL_JOB_STATES = frozenset(state_values(TERMINAL_JOB_STATES))
# Ledger entries one combined write sets (`count_many`). The stand-in drops an update's `$inc`
# once it has about 63 fields or more (docs/mongodb-stand-in.md): well below that.
COMBINED_ENTRIES = 32
_ATTEMPTS = 8  # compare-and-set rounds before giving up (each lost one means another writer progressed)


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a document, else an empty one (fields read back tolerantly)."""
    return value if isinstance(value, dict) else {}


def ledger_key(job_id: str, shard_key: str) -> str:
    """The shard's field in its bucket's entries: its key without the job id (`s0007` for `<job>:0007`)."""
    suffix = shard_key.removeprefix(f"{job_id}:")
    return "s" + suffix.replace(".", "_").replace("$", "_")  # a field name, not a path


def shard_key_of(job_id: str, key: str) -> str:
    """The shard key a ledger field stands for (the inverse of `ledger_key`)."""
    return f"{job_id}:{key[1:]}"


def bucket_of(job_id: str, shard_key: str) -> int:
    """The ledger bucket of a shard: its index (`<job>:<index>`) // `BUCKET_SHARDS`; a key of
    another shape goes to bucket -1."""
    suffix = shard_key.removeprefix(f"{job_id}:")
    return int(suffix) // BUCKET_SHARDS if suffix.isdigit() else -1


def bucket_id(job_id: str, bucket: int) -> str:
    return f"{job_id}/{bucket}"


def empty_buckets(job_id: str, shard_keys: Iterable[str]) -> list[dict[str, Any]]:
    """The ledger buckets of these shards, empty: what the scheduler records with a job's shards,
    so a shard's first count finds its bucket (a missing one is created on first use)."""
    return [_empty_bucket(job_id, bucket) for bucket in dict.fromkeys(bucket_of(job_id, key) for key in shard_keys)]


def _empty_bucket(job_id: str, bucket: int) -> dict[str, Any]:
    return {"_id": bucket_id(job_id, bucket), "job_id": job_id, "bucket": bucket, ENTRIES: {}, COUNTS: {}, SEQ: 0}


def entry(state: str, totals: dict[str, int], weight: int) -> str:
    """The ledger entry of a terminal shard (a string: compared by equality on every server)."""
    return "|".join([str(state), *(str(int(totals.get(field, 0))) for field in TOTALS), str(int(weight))])


def contribution(value: str | None) -> dict[str, int]:
    """What a ledger entry added to the counters (nothing for None)."""
    if not value:
        return {}
    state, *numbers = str(value).split("|")
    added = {field: int(number) for field, number in zip((*TOTALS, WEIGHT_DONE), numbers, strict=False)}
    if state in SHARD_COUNTERS:
        added[SHARD_COUNTERS[ShardState(state)]] = 1
    return added


def counts_of(job: dict[str, Any]) -> dict[str, int]:
    """Every counter of a job (or bucket) document (0 where none was added yet)."""
    stored = as_dict(job.get(COUNTS))
    return {field: int(stored.get(field) or 0) for field in COUNTER_FIELDS}


@dataclass(frozen=True)
class Snapshot:
    """A bucket's state as a job applies it: its `seq` and its counters."""

    seq: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def encode(self) -> str:
        return "|".join([str(self.seq), *(str(int(self.counts.get(name, 0))) for name in COUNTER_FIELDS)])

    @classmethod
    def decode(cls, value: Any) -> "Snapshot":
        if not isinstance(value, str) or not value:
            return cls()
        seq, *numbers = value.split("|")
        return cls(int(seq), {name: int(number) for name, number in zip(COUNTER_FIELDS, numbers, strict=False)})

    @classmethod
    def of_bucket(cls, bucket: dict[str, Any] | None) -> "Snapshot":
        return cls() if bucket is None else cls(int(bucket.get(SEQ) or 0), counts_of(bucket))

    def plus(self, delta: dict[str, int]) -> "Snapshot":
        return Snapshot(self.seq + 1, {name: self.counts.get(name, 0) + delta.get(name, 0) for name in COUNTER_FIELDS})


async def shard_entry(db: AsyncDatabase, shard: dict[str, Any]) -> str | None:
    """The ledger entry a shard should have now: None unless it is terminal.

    A SUCCEEDED shard carries its checkpoint's counters (`totals`, written by the worker in the
    fenced update that ended it, from its last commit: nothing writes the checkpoint after that),
    so its entry needs no read; any other terminal shard's counters are read from its checkpoint."""
    state = str(shard.get("state"))
    if state not in SHARD_COUNTERS:
        return None
    totals = shard.get("totals")
    if state != ShardState.SUCCEEDED or not isinstance(totals, dict):
        totals = await db[CHECKPOINTS].find_one({"_id": checkpoint_id(shard["shard_key"])}, dict.fromkeys(TOTALS, 1))
    # Only a succeeded shard's work is done: a failed or cancelled one adds its records but no
    # progress (a job that failed on a missing source reports 0 %, not 100 %).
    weight = int(shard.get("records_estimate") or 0) if state == ShardState.SUCCEEDED else 0
    return entry(state, totals or {}, weight)


SHARD_FIELDS = {"shard_key": 1, "job_id": 1, "state": 1, "records_estimate": 1, "totals": 1}


def _read_field(document: dict[str, Any], path: str) -> Any:
    """A dotted path of a projected document: nested on MongoDB, a flat key on the stand-in
    (docs/mongodb-stand-in.md); read either."""
    if path in document:
        return document[path]
    value: Any = document
    for part in path.split("."):
        value = as_dict(value).get(part)
    return value


async def _write_bucket(
    db: AsyncDatabase, job_id: str, bucket: int, changes: dict[str, tuple[str | None, str | None]]
) -> tuple[Snapshot, Snapshot] | None:
    """Swap entries of one bucket (`{field: (current, wanted)}`, None = absent) and add their
    difference to its counters, in one update conditional on every entry still being `current`.
    Returns the bucket's snapshots before and after, or None if the condition did not hold
    (nothing written). A bucket's document is created (empty) the first time it is needed."""
    delta: Counter[str] = Counter()
    update: dict[str, Any] = {"$inc": {SEQ: 1}}
    where: dict[str, Any] = {"_id": bucket_id(job_id, bucket)}
    for name, (current, wanted) in changes.items():
        delta.update(contribution(wanted))
        delta.subtract(contribution(current))
        path = f"{ENTRIES}.{name}"
        # "missing" is $exists false: on the stand-in it also matches an explicit null, never written here.
        where[path] = current if current is not None else {"$exists": False}
        if wanted is None:
            update.setdefault("$unset", {})[path] = ""
        else:
            update.setdefault("$set", {})[path] = wanted
    update["$inc"].update({f"{COUNTS}.{name}": delta[name] for name in COUNTER_FIELDS if delta[name]})
    projection = {COUNTS: 1, SEQ: 1}
    for _ in range(2):
        before = await db[JOB_TALLIES].find_one_and_update(where, update, projection=projection, return_document=ReturnDocument.BEFORE)
        if before is not None:
            old = Snapshot.of_bucket(before)
            return old, old.plus(delta)
        try:  # no match: the bucket is new (create it and try once more), or an entry is not `current`
            await db[JOB_TALLIES].insert_one(_empty_bucket(job_id, bucket))
        except DuplicateKeyError:
            return None
    return None


async def _apply(
    db: AsyncDatabase, job_id: str, bucket: int, before: Snapshot, after: Snapshot, fields: dict[str, int] | None
) -> dict[str, Any] | None:
    """Make the job's counters include the bucket as `after` instead of `before`: one update
    conditional on the job not being final and holding snapshot `before` of that bucket. Returns
    the job as written (projected on `fields`, at least its `_id`), None if the condition did
    not hold (nothing written)."""
    key = f"{LEDGER}.b{bucket}"
    changed = {f"{COUNTS}.{name}": after.counts.get(name, 0) - before.counts.get(name, 0) for name in COUNTER_FIELDS}
    update: dict[str, Any] = {"$set": {key: after.encode()}}
    if increments := {name: value for name, value in changed.items() if value}:
        update["$inc"] = increments
    where = {
        "_id": job_id,
        "state": {"$nin": sorted(_FINAL_JOB_STATES)},
        key: before.encode() if before.seq else {"$exists": False},
    }
    # One round trip that also returns what the roll-up reads (find_one_and_update, not update_one + find_one).
    return await db[JOBS].find_one_and_update(where, update, projection=fields or {"_id": 1}, return_document=ReturnDocument.AFTER)


async def _write_and_apply(
    db: AsyncDatabase, job_id: str, bucket: int, changes: dict[str, tuple[str | None, str | None]], fields: dict[str, int] | None
) -> tuple[bool, dict[str, Any] | None]:
    """`_write_bucket`, then the job brought up to the bucket: (whether the bucket was written,
    the job as the apply left it or None if another writer applied it)."""
    written = await _write_bucket(db, job_id, bucket, changes)
    if written is None:
        return False, None
    before, after = written
    job = await _apply(db, job_id, bucket, before, after, fields)
    if job is None:  # the job lags behind the bucket (a lost apply) or is ahead of `after` (a later one won)
        job = await _catch_up(db, job_id, bucket, fields)
    return True, job


async def _catch_up(db: AsyncDatabase, job_id: str, bucket: int, fields: dict[str, int] | None) -> dict[str, Any] | None:
    """Bring the job's counters up to the bucket's current state, whoever wrote it: returns the
    job as written, or None when there was nothing to apply (the job holds the bucket's latest
    snapshot, or is final, or gone)."""
    key = f"{LEDGER}.b{bucket}"
    for _ in range(_ATTEMPTS):
        latest = Snapshot.of_bucket(await db[JOB_TALLIES].find_one({"_id": bucket_id(job_id, bucket)}, {COUNTS: 1, SEQ: 1}))
        job = await db[JOBS].find_one({"_id": job_id}, {key: 1, "state": 1})
        if job is None or str(job.get("state")) in _FINAL_JOB_STATES:
            return None
        held = Snapshot.decode(_read_field(job, key))
        if held.seq >= latest.seq:
            return None
        if (written := await _apply(db, job_id, bucket, held, latest, fields)) is not None:
            return written
    logger.warning("job %s: bucket %d kept changing under %d attempts; the reconcile pass retries", job_id, bucket, _ATTEMPTS)
    return None


async def count_shard(db: AsyncDatabase, shard_key: str, shard: dict[str, Any] | None = None) -> bool:
    """Make the job's counters include this shard as it is now (idempotent; safe anywhere).

    Terminal and not counted: added; counted with another state (replayed and ended again): the
    difference; counted but no longer terminal (reopened): subtracted. Returns True if this call
    changed the ledger, or brought a lagging job up to it (a finished job's counters stay as they
    are: its bucket records the change, applied if a replay reopens it). See `count_and_read`."""
    counted, _ = await count_and_read(db, shard_key, shard)
    return counted


async def count_and_read(
    db: AsyncDatabase, shard_key: str, shard: dict[str, Any] | None = None, fields: dict[str, int] | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """`count_shard`, also returning the job document as the counting write left it (projected on
    `fields`; None when nothing was written), so a roll-up after it need not read the job again.

    Reads the shard by `_id` (its `shard_key`) and, unless it carries its totals, its
    checkpoint, then writes its bucket once, conditional on the shard's entry being absent, and
    the job once: the common case (a shard's first count). Only when the bucket write matches
    nothing (counted already: a duplicate event; or another state: a replay) is the entry read
    and swapped (more round trips only when another writer raced it)."""
    if shard is None:
        shard = await db[SHARDS].find_one({"_id": shard_key}, SHARD_FIELDS)
        if shard is None:
            return False, None
    return await _count(db, shard, await shard_entry(db, shard), fields)


async def _count(
    db: AsyncDatabase, read: dict[str, Any], wanted: str | None, fields: dict[str, int] | None
) -> tuple[bool, dict[str, Any] | None]:
    """`count_and_read` of a shard already read (`read`, with `SHARD_FIELDS`) whose entry should
    be `wanted` (`shard_entry`): its first write guesses the entry absent, as there."""
    shard_key = read["shard_key"]
    shard: dict[str, Any] | None = read
    guess = True  # first try the common case, terminal and not counted yet, without reading the bucket
    for _ in range(_ATTEMPTS):
        if shard is None:
            shard = await db[SHARDS].find_one({"_id": shard_key}, SHARD_FIELDS)
            if shard is None:
                return False, None
            wanted = await shard_entry(db, shard)
        job_id = shard["job_id"]
        bucket, name = bucket_of(job_id, shard_key), ledger_key(job_id, shard_key)
        if guess and wanted is not None:
            current = None
        else:
            path = f"{ENTRIES}.{name}"
            current = _read_field(await db[JOB_TALLIES].find_one({"_id": bucket_id(job_id, bucket)}, {path: 1}) or {}, path)
            if current == wanted:
                # Counted already; its job may still lag (a crash between the two writes): catch it up.
                job = await _catch_up(db, job_id, bucket, fields)
                return job is not None, job
        written, job = await _write_and_apply(db, job_id, bucket, {name: (current, wanted)}, fields)
        if written:
            return True, job
        if not guess:
            shard = None  # raced: read both again
        guess = False  # counted already (a duplicate), or raced: read the entry
    logger.warning("shard %s: its bucket kept changing under %d attempts; the reconcile pass retries", shard_key, _ATTEMPTS)
    return False, None


async def count_many(
    db: AsyncDatabase, shard_keys: Iterable[str], fields: dict[str, int] | None = None
) -> dict[str, dict[str, Any] | None]:
    """`count_and_read` for many shards at once (a batch of ShardFinished events), sharing the
    round trips: `{job_id: the job as the last counting write for it left it (projected on
    `fields`), or None if nothing was written for it}`, one key per job of a known shard
    (unknown keys are skipped; a key given twice is counted once).

    One `find` reads every shard (`_id` `$in`), then each bucket is written once per
    `COMBINED_ENTRIES` of its shards (their entries set and their figures added in one update
    that requires every one of those entries absent: exactly what counting them one by one would
    do) and applied to its job. Plus a checkpoint read per shard that does not carry its totals
    (as in `shard_entry`). A bucket whose combined write matches nothing (a shard of it counted
    already: a duplicate event; another writer) has its shards counted one by one
    (`count_and_read`: correct in every case, a round trip or more each), as does a shard that
    is not terminal (reopened by a DLQ replay: its entry is taken out)."""
    keys = list(dict.fromkeys(shard_keys))
    if not keys:
        return {}
    shards = [shard async for shard in db[SHARDS].find({"_id": {"$in": keys}}, SHARD_FIELDS)]
    groups: dict[str, dict[int, list[tuple[dict[str, Any], str | None]]]] = {}
    for shard in shards:
        bucket = bucket_of(shard["job_id"], shard["shard_key"])
        groups.setdefault(shard["job_id"], {}).setdefault(bucket, []).append((shard, await shard_entry(db, shard)))
    written: dict[str, dict[str, Any] | None] = {}
    for job_id, buckets in groups.items():
        last: dict[str, Any] | None = None
        for bucket, group in buckets.items():
            one_by_one: list[tuple[dict[str, Any], str | None]] = [(shard, wanted) for shard, wanted in group if wanted is None]
            ended: list[tuple[dict[str, Any], str | None]] = [(shard, wanted) for shard, wanted in group if wanted is not None]
            for first in range(0, len(ended), COMBINED_ENTRIES):
                chunk = ended[first : first + COMBINED_ENTRIES]
                changes: dict[str, tuple[str | None, str | None]] = {ledger_key(job_id, shard["shard_key"]): (None, wanted) for shard, wanted in chunk}
                if len(changes) != len(chunk):  # two keys share a ledger field (`ledger_key`): one by one
                    one_by_one.extend(chunk)
                    continue
                done, job = await _write_and_apply(db, job_id, bucket, changes, fields)
                if not done:
                    one_by_one.extend(chunk)
                last = job or last
            for shard, wanted in one_by_one:
                _, job = await _count(db, shard, wanted, fields)
                last = job or last
        written[job_id] = last
    return written


async def ledger(db: AsyncDatabase, job_id: str) -> dict[str, str]:
    """Every entry of the job's ledger (`{s<index>: entry}`), from its buckets (O(shards): for the
    reconcile pass and the final result only)."""
    entries: dict[str, str] = {}
    async for bucket in db[JOB_TALLIES].find({"job_id": job_id}, {ENTRIES: 1}):
        entries.update({k: v for k, v in as_dict(bucket.get(ENTRIES)).items() if isinstance(v, str)})
    return entries


async def uncounted(db: AsyncDatabase, job_id: str, shards: list[dict[str, Any]] | None = None) -> int:
    """The reconcile pass: bring every shard of the job in line with the ledger (a shard finished
    while the events were lost, or a crash between a shard's transition and its counting) and the
    job's counters up to every bucket (a crash between a bucket's write and its apply). Reads the
    job's shards (by the `job_id` index) and buckets: O(shards), for the periodic pass only.
    `shards`: the job's shards already read (with `SHARD_FIELDS`), to spare a second read.
    Returns how many shards and buckets it (re)counted."""
    job = await db[JOBS].find_one({"_id": job_id}, {LEDGER: 1})
    if job is None:
        return 0
    held = {name: Snapshot.decode(value).seq for name, value in as_dict(job.get(LEDGER)).items()}
    fixed = 0
    entries: dict[str, str] = {}
    async for bucket in db[JOB_TALLIES].find({"job_id": job_id}, {ENTRIES: 1, SEQ: 1, "bucket": 1}):
        entries.update(as_dict(bucket.get(ENTRIES)))
        if int(bucket.get(SEQ) or 0) > held.get(f"b{bucket.get('bucket')}", 0):
            fixed += int(await _catch_up(db, job_id, int(bucket["bucket"]), None) is not None)
    if shards is None:
        shards = [s async for s in db[SHARDS].find({"job_id": job_id}, SHARD_FIELDS)]
    for shard in shards:
        counted = entries.get(ledger_key(job_id, shard["shard_key"]))
        terminal = str(shard.get("state")) in SHARD_COUNTERS
        if (counted is None) == terminal or (terminal and str(counted).split("|", 1)[0] != str(shard["state"])):
            fixed += int(await count_shard(db, shard["shard_key"], shard))
    return fixed


async def failed_shard_keys(db: AsyncDatabase, job_id: str) -> list[str]:
    """The keys of the shards the ledger has as FAILED, sorted."""
    failed = [k for k, v in (await ledger(db, job_id)).items() if v.startswith(f"{ShardState.FAILED}|")]
    return sorted(shard_key_of(job_id, k) for k in failed)


async def migrate_legacy_ledgers(db: AsyncDatabase) -> int:
    """Move the in-document ledger of jobs counted by an older Cairn (`tally.s<index>` entries in
    the job) into buckets; returns how many jobs it moved. Every service that counts (scheduler,
    DLQ handler) runs it before it consumes anything, with no older one still running (README,
    "Upgrading"). Finished jobs too: a DLQ replay reopens them. It reads only jobs that still have
    the old field (`tally`, unset once moved), so later starts find nothing to read.

    Per job not moved yet (no snapshot in `ledger`): each bucket is inserted with its entries,
    their sum and `seq` 1 (one already there must hold exactly those entries at `seq` 1: inserted
    by another mover, or by this one before a crash; anything else is logged and the job left as
    it is), then one update conditional on the job still holding its old entries and no snapshot
    sets the snapshots of all its buckets at `seq` 1 (the job's counters already are their sum):
    of concurrent movers one applies, before any of them counts. Then the old entries are unset
    `_UNSET_CHUNK` at a time (the stand-in drops the operators of an update of ~129 fields or
    more: docs/mongodb-stand-in.md), the old field last. Idempotent."""
    moved = 0
    async for job in db[JOBS].find({LEGACY_LEDGER: {"$exists": True}}, {LEGACY_LEDGER: 1, LEDGER: 1}):
        job_id = job["_id"]
        old = {k: v for k, v in as_dict(job.get(LEGACY_LEDGER)).items() if k.startswith("s") and isinstance(v, str)}
        buckets: dict[int, dict[str, str]] = {}
        for name, value in old.items():
            buckets.setdefault(bucket_of(job_id, shard_key_of(job_id, name)), {})[name] = value
        if old and not as_dict(job.get(LEDGER)):
            snapshots = await _insert_legacy_buckets(db, job_id, buckets)
            if snapshots is None:
                continue
            first = next(iter(old))
            where = {"_id": job_id, f"{LEGACY_LEDGER}.{first}": {"$exists": True}, **{key: {"$exists": False} for key in snapshots}}
            result = await db[JOBS].update_one(where, {"$set": snapshots, "$unset": {f"{LEGACY_LEDGER}.{first}": ""}})
            moved += result.modified_count
            if result.modified_count:
                logger.info("job %s: its ledger of %d shards moved to %d bucket(s)", job_id, len(old), len(buckets))
        moved_already = {"_id": job_id, LEDGER: {"$exists": True}} if old else {"_id": job_id}
        names = sorted(old)
        for at in range(0, len(names), _UNSET_CHUNK):  # only once the job holds the snapshots
            await db[JOBS].update_one(moved_already, {"$unset": {f"{LEGACY_LEDGER}.{name}": "" for name in names[at : at + _UNSET_CHUNK]}})
        await db[JOBS].update_one(moved_already, {"$unset": {LEGACY_LEDGER: ""}})
    return moved


_UNSET_CHUNK = 100


async def _insert_legacy_buckets(db: AsyncDatabase, job_id: str, buckets: dict[int, dict[str, str]]) -> dict[str, str] | None:
    """Insert the buckets of an old in-document ledger at `seq` 1; returns the job's snapshots
    of them, or None (logged) if a bucket is there with other entries."""
    snapshots: dict[str, str] = {}
    for bucket, entries in buckets.items():
        sums: Counter[str] = Counter()
        for value in entries.values():
            sums.update(contribution(value))
        snapshot = Snapshot(1, {name: sums[name] for name in COUNTER_FIELDS})
        document = _empty_bucket(job_id, bucket) | {ENTRIES: entries, COUNTS: snapshot.counts, SEQ: 1}
        try:
            await db[JOB_TALLIES].insert_one(document)
        except DuplicateKeyError:
            there = await db[JOB_TALLIES].find_one({"_id": document["_id"]}) or {}
            if as_dict(there.get(ENTRIES)) != entries or int(there.get(SEQ) or 0) != 1:
                logger.error(
                    "job %s: ledger bucket %d exists with other entries than the job's old ledger (was it counted by this "
                    "version before its ledger was moved?); the job is left as it is", job_id, bucket,
                )
                return None
        snapshots[f"{LEDGER}.b{bucket}"] = snapshot.encode()
    return snapshots
