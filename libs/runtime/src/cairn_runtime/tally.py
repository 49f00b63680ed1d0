"""A job's counters, kept up to date shard by shard: each terminal shard is added exactly once.

The job document carries the counters (`counts`) and, next to them, a ledger (`tally`) naming
what each shard contributed: `tally.s<index>` is `"<state>|<records_done>|<records_written>|
<records_redone>|<batches>|<weight>"`. Counting a shard (`count_shard`) is one conditional update
of the job document: compare-and-set of the shard's ledger entry together with the `$inc` of the
difference, so the entry and the counters can never disagree (no multi-document transaction, no
crash window between "marked" and "added"):

- a duplicate ShardFinished, a second scheduler, the periodic reconcile: the entry already says
  what the shard says, nothing is written;
- a crash anywhere before that update: the shard is terminal but absent from the ledger, and the
  next event or the reconcile pass (`uncounted`) adds it;
- a FAILED shard reopened by a DLQ replay is taken back out (its entry removed, its figures
  subtracted), and counted again when it ends.

So the roll-up and the status read one document; only the reconcile pass reads a job's shards.
`weight` is a succeeded shard's `records_estimate` (0 for a failed or cancelled one): the share of
the job's progress it stands for.

`count_many` counts a batch of shards with one read of the shards and one write per job (every
entry set at once, on the condition that none of them was there), falling back to the
shard-by-shard compare-and-set whenever that condition fails: the same exactly-once, fewer round
trips.
"""

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.sinks import CHECKPOINT_COUNTERS
from cairn_contracts.states import TERMINAL_JOB_STATES, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, JOBS, MAIN_SUB_KEY, SHARDS

logger = logging.getLogger(__name__)

COUNTS = "counts"  # job field: the counters below
LEDGER = "tally"  # job field: shard index -> what it contributed to COUNTS
TOTALS = CHECKPOINT_COUNTERS  # a checkpoint's counters (cairn_contracts.sinks), summed per job
SHARD_COUNTERS = {
    ShardState.SUCCEEDED: "shards_succeeded",
    ShardState.FAILED: "shards_failed",
    ShardState.CANCELLED: "shards_cancelled",
}
WEIGHT_DONE = "weight_done"  # sum of the succeeded shards' records_estimate
COUNTER_FIELDS = (*SHARD_COUNTERS.values(), *TOTALS, WEIGHT_DONE)
_FINAL_JOB_STATES = frozenset(state_values(TERMINAL_JOB_STATES))
# Ledger entries one combined write sets (`count_many`). The stand-in drops an update's `$inc`
# once it has about 63 fields or more (docs/mongodb-stand-in.md): well below that.
COMBINED_ENTRIES = 32
_ATTEMPTS = 8  # compare-and-set rounds before giving up (each lost one means another writer progressed)


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a document, else an empty one (fields read back tolerantly)."""
    return value if isinstance(value, dict) else {}


def ledger_key(job_id: str, shard_key: str) -> str:
    """The shard's field in the ledger: its key without the job id (`s0007` for `<job>:0007`)."""
    suffix = shard_key.removeprefix(f"{job_id}:")
    return "s" + suffix.replace(".", "_").replace("$", "_")  # a field name, not a path


def shard_key_of(job_id: str, key: str) -> str:
    """The shard key a ledger field stands for (the inverse of `ledger_key`)."""
    return f"{job_id}:{key[1:]}"


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
    """Every counter of a job document (0 where none was added yet)."""
    stored = as_dict(job.get(COUNTS))
    return {field: int(stored.get(field) or 0) for field in COUNTER_FIELDS}


def checkpoint_id(shard_key: str) -> str:
    return f"{shard_key}/{MAIN_SUB_KEY}"


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


async def count_shard(db: AsyncDatabase, shard_key: str, shard: dict[str, Any] | None = None) -> bool:
    """Make the job's counters include this shard as it is now (idempotent; safe anywhere).

    Terminal and not counted: added; counted with another state (replayed and ended again): the
    difference; counted but no longer terminal (reopened): subtracted. Returns True if this call
    changed the counters. See `count_and_read`."""
    counted, _ = await count_and_read(db, shard_key, shard)
    return counted


async def count_and_read(
    db: AsyncDatabase, shard_key: str, shard: dict[str, Any] | None = None, fields: dict[str, int] | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """`count_shard`, also returning the job document as the counting write left it (projected on
    `fields`; None when nothing was written), so a roll-up after it need not read the job again.

    Reads the shard by `shard_key` (unique index) and its checkpoint by `_id`, then writes the job
    once, conditional on the shard's ledger entry being absent: the common case (a shard's first
    count) is those three round trips. Only when that write matches nothing (counted already: a
    duplicate event; or another state: a replay) is the job's one ledger entry read and swapped
    (more round trips only when another writer raced it)."""
    if shard is None:
        shard = await db[SHARDS].find_one({"shard_key": shard_key}, SHARD_FIELDS)
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
    guess = True  # first try the common case, terminal and not counted yet, without reading the job
    for _ in range(_ATTEMPTS):
        if shard is None:
            shard = await db[SHARDS].find_one({"shard_key": shard_key}, SHARD_FIELDS)
            if shard is None:
                return False, None
            wanted = await shard_entry(db, shard)
        job_id, field = shard["job_id"], ledger_key(shard["job_id"], shard["shard_key"])
        key = f"{LEDGER}.{field}"
        if guess and wanted is not None:
            current = None
        else:
            job = await db[JOBS].find_one({"_id": job_id}, {key: 1, "state": 1})
            if job is None or str(job.get("state")) in _FINAL_JOB_STATES:
                return False, None  # a finished job's figures are final (a DLQ replay reopens it first)
            # A projection on a dotted path comes back nested on MongoDB, as a flat "tally.sN" key
            # on the stand-in (docs/mongodb-stand-in.md): read either.
            current = job.get(key) if key in job else as_dict(job.get(LEDGER)).get(field)
            if current == wanted:
                return False, None
        written = await _swap(db, job_id, key, current, wanted, fields)
        if written is not None:
            return True, written
        if not guess:
            shard = None  # raced: read both again
        guess = False  # counted already (a duplicate), or raced: read the ledger entry
    logger.warning("shard %s: its job's counters kept changing under %d attempts; the reconcile pass retries", shard_key, _ATTEMPTS)
    return False, None


async def count_many(
    db: AsyncDatabase, shard_keys: Iterable[str], fields: dict[str, int] | None = None
) -> dict[str, dict[str, Any] | None]:
    """`count_and_read` for many shards at once (a batch of ShardFinished events), sharing the
    round trips: `{job_id: the job as the last counting write for it left it (projected on
    `fields`), or None if nothing was written for it}`, one key per job of a known shard
    (unknown keys are skipped; a key given twice is counted once).

    One `find` reads every shard (`shard_key` `$in`), then each job is written once per
    `COMBINED_ENTRIES` shards: their entries set and their figures added in one conditional update that requires
    the job not final and every one of those entries absent, so it is exactly what counting them
    one by one would do. Plus a checkpoint read per shard that does not carry its totals (as in
    `shard_entry`). A job whose combined write matches nothing (a shard of it counted already: a
    duplicate event; another writer; the job final) has its shards counted one by one
    (`count_and_read`: correct in every case, a round trip or more each), as does a shard that
    is not terminal (reopened by a DLQ replay: its entry is taken out)."""
    keys = list(dict.fromkeys(shard_keys))
    if not keys:
        return {}
    shards = [shard async for shard in db[SHARDS].find({"shard_key": {"$in": keys}}, SHARD_FIELDS)]
    groups: dict[str, list[tuple[dict[str, Any], str | None]]] = {}
    for shard in shards:
        groups.setdefault(shard["job_id"], []).append((shard, await shard_entry(db, shard)))
    written: dict[str, dict[str, Any] | None] = {}
    for job_id, group in groups.items():
        last: dict[str, Any] | None = None
        one_by_one: list[tuple[dict[str, Any], str | None]] = [(shard, wanted) for shard, wanted in group if wanted is None]
        ended: list[tuple[dict[str, Any], str | None]] = [(shard, wanted) for shard, wanted in group if wanted is not None]
        for first in range(0, len(ended), COMBINED_ENTRIES):
            chunk = ended[first : first + COMBINED_ENTRIES]
            job = await _add_all(db, job_id, {shard["shard_key"]: str(wanted) for shard, wanted in chunk}, fields)
            if job is None:
                one_by_one.extend(chunk)
            last = job or last
        for shard, wanted in one_by_one:
            _, job = await _count(db, shard, wanted, fields)
            last = job or last
        written[job_id] = last
    return written


async def _add_all(
    db: AsyncDatabase, job_id: str, entries: dict[str, str], fields: dict[str, int] | None
) -> dict[str, Any] | None:
    """Add shards not counted yet (`{shard_key: wanted entry}`, all of one job) in one update,
    conditional on the job not being final and none of their entries being there; returns the
    job as written (projected on `fields`, at least its `_id`), None if the condition did not
    hold (then nothing was written)."""
    ledger = {f"{LEDGER}.{ledger_key(job_id, shard_key)}": wanted for shard_key, wanted in entries.items()}
    if len(ledger) != len(entries):
        return None  # two keys share a ledger field (`ledger_key`): one by one, as before
    added: Counter[str] = Counter()
    for wanted in entries.values():
        added.update(contribution(wanted))
    update: dict[str, Any] = {"$set": ledger}
    if increments := {f"{COUNTS}.{field}": added[field] for field in COUNTER_FIELDS if added[field]}:
        update["$inc"] = increments
    where: dict[str, Any] = {
        "_id": job_id,
        "state": {"$nin": sorted(_FINAL_JOB_STATES)},
        **{key: {"$exists": False} for key in ledger},
    }
    return await db[JOBS].find_one_and_update(where, update, projection=fields or {"_id": 1}, return_document=ReturnDocument.AFTER)


async def _swap(
    db: AsyncDatabase, job_id: str, key: str, current: str | None, wanted: str | None, fields: dict[str, int] | None = None
) -> dict[str, Any] | None:
    """Replace ledger entry `current` by `wanted` and apply the difference to the counters, in one
    update conditional on the entry still being `current`; returns the job as written (projected
    on `fields`, at least its `_id`), None if the condition did not hold."""
    old, new = contribution(current), contribution(wanted)
    delta = {f"{COUNTS}.{field}": new.get(field, 0) - old.get(field, 0) for field in COUNTER_FIELDS}
    update: dict[str, Any] = {}
    if changed := {field: value for field, value in delta.items() if value}:
        update["$inc"] = changed
    if wanted is None:
        update["$unset"] = {key: ""}
    else:
        update["$set"] = {key: wanted}
    # "missing" is $exists false: on the stand-in it also matches an explicit null, never written here.
    where: dict[str, Any] = {
        "_id": job_id,
        "state": {"$nin": sorted(_FINAL_JOB_STATES)},
        key: current if current is not None else {"$exists": False},
    }
    # One round trip that also returns what the roll-up reads (find_one_and_update, not
    # update_one + find_one).
    return await db[JOBS].find_one_and_update(where, update, projection=fields or {"_id": 1}, return_document=ReturnDocument.AFTER)


async def uncounted(db: AsyncDatabase, job_id: str, shards: list[dict[str, Any]] | None = None) -> int:
    """The reconcile pass: bring every shard of the job in line with the ledger (a shard finished
    while the events were lost, or a crash between a shard's transition and its counting). Reads
    the job's shards (by the `job_id` index) and its ledger: O(shards), for the periodic pass only.
    `shards`: the job's shards already read (with `SHARD_FIELDS`), to spare a second read.
    Returns how many shards it (re)counted."""
    job = await db[JOBS].find_one({"_id": job_id}, {LEDGER: 1})
    if job is None:
        return 0
    ledger = as_dict(job.get(LEDGER))
    fixed = 0
    if shards is None:
        shards = [s async for s in db[SHARDS].find({"job_id": job_id}, SHARD_FIELDS)]
    for shard in shards:
        counted = ledger.get(ledger_key(job_id, shard["shard_key"]))
        terminal = str(shard.get("state")) in SHARD_COUNTERS
        if (counted is None) == terminal or (terminal and str(counted).split("|", 1)[0] != str(shard["state"])):
            fixed += int(await count_shard(db, shard["shard_key"], shard))
    return fixed


def failed_shard_keys(job: dict[str, Any]) -> list[str]:
    """The keys of the shards the ledger has as FAILED, sorted."""
    ledger = as_dict(job.get(LEDGER))
    failed = [k for k, v in ledger.items() if isinstance(v, str) and v.startswith(f"{ShardState.FAILED}|")]
    return sorted(shard_key_of(job["_id"], k) for k in failed)
