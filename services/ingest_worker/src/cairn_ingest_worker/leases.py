"""A worker's hold on one shard: the lease, its heartbeat, and every write fenced by its token.

Claiming increments the shard's fencing token. Every later write (checkpoint, completion,
failure) is conditional on that token, so a worker whose lease expired (paused, partitioned,
slow) cannot overwrite the progress of the worker that took the shard over.
"""

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure

from cairn_contracts import clock
from cairn_contracts.sinks import CHECKPOINT_COUNTERS
from cairn_contracts.states import ShardState
from cairn_contracts.store import NOT_CANCELLED, QUEUED_TASK, checkpoint_id, shard_key_for
from cairn_ingest_worker import metrics
from cairn_ingest_worker.errors import StoreUnavailable
from cairn_ingest_worker.store import WriteCounts

logger = logging.getLogger(__name__)

# Lease deadlines (`lease_until`) and retry times are integer epoch milliseconds (cairn_contracts.clock):
# they compare the same on every server (the MongoDB stand-in stores a datetime written by $set
# as text, which no date query matches).


_CLAIM_ROUNDS = 3  # compare-and-set attempts of one claim while the shard keeps moving
_CLAIM_FIELDS = {
    "shard_key": 1, "state": 1, "fencing_token": 1, "lease_until": 1, "cancel_requested": 1, "next_retry_at_ms": 1, "index": 1,
}


def claimable(shard: dict[str, Any], now_ms: int, *, due_only: bool = False) -> bool:
    """Whether a claim may take the shard now: its job not cancelled, and it is waiting (a
    RETRY one, with `due_only`, once its retry is due) or RUNNING under an expired lease."""
    if shard.get("cancel_requested"):  # truthiness: the stand-in reads a $set boolean back as 1
        return False
    state = shard.get("state")
    if state in (ShardState.PLANNED, ShardState.QUEUED):
        return True
    if state == ShardState.RETRY:
        due = shard.get("next_retry_at_ms")
        return not due_only or (isinstance(due, int) and due <= now_ms)
    lease = shard.get("lease_until")
    return state == ShardState.RUNNING and isinstance(lease, int) and lease < now_ms


def _waiting(shard_key: str) -> dict[str, Any]:
    """The claim filter of the common case, a shard waiting for its first run: equality on the
    shard's `_id` (its `shard_key`) and the rest checked on that one document (no `$or`)."""
    return {
        "_id": shard_key,
        "state": {"$in": [ShardState.PLANNED, ShardState.QUEUED]},
        **NOT_CANCELLED,
    }


def _as_read(shard: dict[str, Any]) -> dict[str, Any]:
    """The compare-and-set filter of a claim: the shard exactly as it was judged claimable."""
    return {
        "_id": shard["shard_key"],
        "state": shard["state"],
        "fencing_token": shard.get("fencing_token", 0),
        "lease_until": shard.get("lease_until"),
        **NOT_CANCELLED,
    }


def _held(claim: "Claim") -> dict[str, Any]:
    """The filter of a write by the claim's holder: its shard (of its submission of the job), its
    token, still RUNNING."""
    return {"_id": claim.shard_key, "fencing_token": claim.token, "state": ShardState.RUNNING, **_same_submission(claim.shard)}


def _renewable(claim: "Claim") -> dict[str, Any]:
    """A lease renewal's filter. Not a handed-off lease (lease_until 0): renewing it would hold the
    continuation back. Not a cancelled job's shard either: a run stuck in one batch must not keep
    it alive."""
    return {**_held(claim), "lease_until": {"$gt": 0}, **NOT_CANCELLED}


def _same_submission(shard: dict[str, Any]) -> dict[str, Any]:
    """The filter part that keeps a claim's writes (fenced writes, commits, adoptions) to the
    documents of its shard's own submission of the job: one deleted and submitted again (same id)
    has new documents under the same ids, their tokens back at 0, which a late claim of the
    earlier one must not take for its own. {} for a shard planned before the stamp existed."""
    stamp = shard.get("job_created_at_ms")
    return {} if stamp is None else {"job_created_at_ms": stamp}


def _is_held_by(shard: dict[str, Any], claim: "Claim") -> bool:
    """Whether the shard as read is the claim's: its token, of its submission of the job."""
    same = all(shard.get(field) == value for field, value in _same_submission(claim.shard).items())
    return same and shard.get("fencing_token") == claim.token


def _holds(claim: "Claim", checkpoint: dict[str, Any]) -> bool:
    """Whether no newer holder has written the claim's checkpoint: it is of the claim's
    submission of the job and holds the claim's token, or, for a claim not adopted yet, an older one."""
    if any(checkpoint.get(field) != value for field, value in _same_submission(claim.shard).items()):
        return False
    token = int(checkpoint.get("fencing_token") or 0)
    return token == claim.token or (not claim.adopted and token < claim.token)


# A hand-off: the lease ends now, the shard stays RUNNING (any runner may claim it at once), and
# the claim's attempt is given back (a handed-off run is not a failed attempt).
_HAND_OFF = {"$set": {"lease_until": 0}, "$inc": {"attempts": -1, "hand_offs": 1}}


@dataclass(frozen=True)
class Commit:
    stored: bool  # False: another worker holds the shard now (a stale fencing token)
    cancel_requested: bool = False  # the job was cancelled: stop at this batch boundary
    # The checkpoint's counters (CHECKPOINT_COUNTERS) as this commit left them: what `succeed`
    # copies onto the shard, so counting it into its job need not read the checkpoint.
    totals: dict[str, int] | None = None


@dataclass(frozen=True)
class Claim:
    shard: dict[str, Any]
    token: int
    cursor: Any  # the pipeline's cursor (JSON, opaque) as last committed; None before the first batch
    reclaimed: bool = False  # taken over from a holder whose lease had expired
    checkpoint_id: Any = None  # the adopted checkpoint's _id: later checkpoint writes match on it
    fresh: bool = True  # no batch committed yet: the runner asks the pipeline where to start
    done: bool = False  # the last committed batch ended the shard (a crash came before its SUCCEEDED)
    batches: int = 0  # batches committed before this claim: the next one's index (the sink's BATCH stamp)
    # Whether the checkpoint holds this claim's token. False only for a bundle's first-ever claim
    # of a shard (`claim_waiting`): its checkpoint is as planned, and is adopted by the claim's
    # first write to it (`finish_all`'s commit, or `adopt_all` before a run of its own).
    adopted: bool = True

    @property
    def shard_key(self) -> str:
        return self.shard["shard_key"]

    @property
    def attempt(self) -> int:
        return int(self.shard["attempts"])


@dataclass(frozen=True)
class OneBatch:
    """A fresh shard's whole run in one batch, read and stored (a bundle's `finish_all`): where
    the batch ended (`cursor`, `position`), the records read and what the sink did with them."""

    claim: Claim
    cursor: Any
    position: int | None
    records: int
    counts: WriteCounts

    def counters(self) -> dict[str, int]:
        """The checkpoint's counters after this batch, from 0 (CHECKPOINT_COUNTERS)."""
        added = {"records_done": self.records, **self.counts.as_checkpoint_inc(), "batches": 1}
        return {counter: int(added.get(counter, 0)) for counter in CHECKPOINT_COUNTERS}


# Lease-frontier item indexes taken from the job's counter per round trip (one `$inc` of the job
# document per this many items). Items taken but not claimed (the runner's slice ended, its
# process died) stay claimable: any runner's scan picks them up once the counter is past the end.
FRONTIER_BLOCK = 8


class ShardLeases:
    def __init__(
        self, shards: Collection, checkpoints: Collection, worker_id: str, ttl_s: float, jobs: Collection | None = None,
        frontier_block: int = FRONTIER_BLOCK,
    ) -> None:
        """`jobs`: where the lease-frontier counter is (None: `claim_next` reads the job's items)."""
        self._shards = shards
        self._jobs = jobs
        self._checkpoints = checkpoints
        self._worker_id = worker_id
        self._ttl_ms = int(ttl_s * 1000)
        self._frontier_block = max(1, frontier_block)
        # job id -> item indexes taken from its counter and not tried yet (this process's block)
        self._taken: dict[str, list[int]] = {}
        self._taken_lock = threading.Lock()

    def claim(self, shard_key: str) -> Claim | None:
        """Take the shard if it is waiting or its holder's lease expired; None if not ours to run.

        A waiting shard (PLANNED, QUEUED) is taken in one compare-and-set by `shard_key` (unique
        index). Otherwise it is read by `shard_key`, judged in code, then taken by a
        compare-and-set on what was read (state, fencing token, lease): no `$or` filter, which a
        server may run as a scan of every shard (the stand-in does)."""
        if (claim := self._claim(_waiting(shard_key), clock.now_ms())) is not None:
            return claim
        for _ in range(_CLAIM_ROUNDS):
            shard = self._shards.find_one({"_id": shard_key}, _CLAIM_FIELDS)
            now_ms = clock.now_ms()
            if shard is None or not claimable(shard, now_ms):
                return None
            claim = self._claim(_as_read(shard), now_ms)
            if claim is not None or not self._moved(shard):
                return claim
        return None  # it kept moving under us: another worker is at it

    def claim_waiting(self, shard_keys: Sequence[str]) -> dict[str, Claim]:
        """A bundle's claim: take every shard of `shard_keys` that waits for its run (PLANNED,
        QUEUED; its job not cancelled) in bulk. Returns {shard_key: Claim} of those taken; the
        others (retrying, running, finished, cancelled, unknown) are the caller's to claim one by
        one (`claim`), as a task of their own would. A claim taken here is not started: `start`
        (or `start_all`) counts its attempt when its run begins, and checks its job was not
        cancelled meanwhile.

        Two round trips whatever the count, where claiming one by one takes two per shard: one
        `update_many` takes them (state, lease, fencing token + 1, tagged with this claim's own
        id), one `find` reads back what it took (their tokens). A shard taken for the first time
        (token 1: no lease was ever held on it) has its checkpoint as planned: nothing to read,
        and nothing to fence off, so it is adopted later, by the claim's first write to it
        (`adopted` False: `finish_all`, `adopt_all`). A shard claimed before (its lease expired,
        it was handed off, replayed) may have a checkpoint written by an older holder: two more
        round trips adopt those checkpoints (`adopt_all`), and a shard whose checkpoint holds
        another token is left out (its lease expires; the reaper sends it again). Raises
        ConnectionFailure when the store is unreachable: shards taken before it happened stay
        RUNNING under this worker's lease until it expires, then the reaper sends them again."""
        keys = list(dict.fromkeys(shard_keys))
        if not keys:
            return {}
        tag, now, now_ms = uuid.uuid4().hex, clock.utcnow(), clock.now_ms()
        taken = {
            "state": ShardState.RUNNING, "taken_by": self._worker_id, "lease_until": now_ms + self._ttl_ms, "started_at": now,
            "bundle_claim": tag,
            # The task fair dispatch counts them as (cairn_contracts.store.QUEUED_TASK): one, also
            # when this claim came before the scheduler marked them QUEUED.
            QUEUED_TASK: keys[0],
        }
        # No attempt is counted here: a shard's attempt is counted when its run starts (`start`),
        # so a crash of the bundle does not charge the shards still waiting their turn.
        self._shards.update_many(
            {"_id": {"$in": keys}, "state": {"$in": [ShardState.PLANNED, ShardState.QUEUED]}, **NOT_CANCELLED},
            {"$set": taken, "$inc": {"fencing_token": 1}},
        )
        shards = [
            shard for shard in self._shards.find({"_id": {"$in": keys}, "bundle_claim": tag})
            if shard.get("state") == ShardState.RUNNING and shard.get("taken_by") == self._worker_id
        ]
        claims = [
            Claim(shard=shard, token=int(shard["fencing_token"]), cursor=None, checkpoint_id=checkpoint_id(shard["shard_key"]), adopted=False)
            for shard in shards
        ]
        first = [claim for claim in claims if claim.token == 1]
        adopted, lost = self.adopt_all([claim for claim in claims if claim.token != 1])
        for claim in lost:
            logger.warning("shard %s: checkpoint held by another token than %d; left to the reaper", claim.shard_key, claim.token)
        return {claim.shard_key: claim for claim in [*first, *adopted]}

    def adopt_all(self, claims: Sequence[Claim]) -> tuple[list[Claim], list[Claim]]:
        """Adopt the checkpoints of the claims not adopted yet (`Claim.adopted`), as `claim` does
        for one (from now on only writes carrying their tokens move them), in two round trips: an
        unordered `bulk_write` conditional on an older token, then a `find` of what they hold.
        Returns (the claims, adopted, with the cursor, batches and `done` read back; those
        adopted already unchanged, in order), (the claims whose checkpoint holds another token:
        a newer holder's; theirs is not to run)."""
        todo = {claim.checkpoint_id or checkpoint_id(claim.shard_key): claim for claim in claims if not claim.adopted}
        if not todo:
            return list(claims), []
        self._checkpoints.bulk_write(
            [
                UpdateOne(
                    {"_id": _id, "fencing_token": {"$lt": claim.token}, **_same_submission(claim.shard)},
                    {"$set": {"fencing_token": claim.token, "taken_by": self._worker_id}},
                )
                for _id, claim in todo.items()
            ],
            ordered=False,
        )
        stored = {c["_id"]: c for c in self._checkpoints.find({"_id": {"$in": list(todo)}})}
        adopted: dict[str, Claim] = {}
        lost: list[Claim] = []
        for _id, claim in todo.items():
            checkpoint = stored.get(_id)
            if checkpoint is None or not _holds(replace(claim, adopted=True), checkpoint):
                lost.append(claim)
                continue
            batches = int(checkpoint.get("batches") or 0)
            adopted[claim.shard_key] = replace(
                claim, cursor=checkpoint.get("cursor"), checkpoint_id=_id, fresh=not batches, done=bool(checkpoint.get("done")),
                batches=batches, adopted=True,
            )
        gone = {claim.shard_key for claim in lost}
        return [adopted.get(claim.shard_key, claim) for claim in claims if claim.shard_key not in gone], lost

    def start(self, claim: Claim) -> Claim | None:
        """Begin the run of a bundle's claim: count its attempt (and clear its `bundle_claim`
        tag: the gateway's terminate interrupts only a started run), fenced, unless its job was
        cancelled meanwhile. Returns the claim as started (attempt counted); None if another
        worker holds the shard now or its job was cancelled (`cancel_requested` tells which)."""
        started = self.start_all([claim])
        return started[0] if started else None

    def start_all(self, claims: Sequence[Claim]) -> list[Claim]:
        """`start` for several claims in one round trip (one more, a read, only when some were
        refused); returns those started, in order."""
        if not claims:
            return []
        result = self._shards.bulk_write(
            [UpdateOne({**_held(c), **NOT_CANCELLED}, {"$inc": {"attempts": 1}, "$set": {"bundle_claim": None}}) for c in claims],
            ordered=False,
        )
        if result.matched_count < len(claims):
            by_key = {c.shard_key: c for c in claims}
            stored = self._shards.find(
                {"_id": {"$in": list(by_key)}}, {"shard_key": 1, "fencing_token": 1, "bundle_claim": 1, "state": 1, "job_created_at_ms": 1}
            )
            ours = {
                s["shard_key"] for s in stored
                if s.get("state") == ShardState.RUNNING and not s.get("bundle_claim") and _is_held_by(s, by_key[s["shard_key"]])
            }
            claims = [c for c in claims if c.shard_key in ours]
        return [replace(c, shard={**c.shard, "attempts": int(c.shard.get("attempts") or 0) + 1, "bundle_claim": None}) for c in claims]

    def renew_all(self, claims: Sequence[Claim]) -> int:
        """Renew the leases of `claims` in one round trip (unordered bulk of `renew`'s fenced
        update); returns how many were renewed (a taken-over or cancelled one is not)."""
        if not claims:
            return 0
        until = clock.now_ms() + self._ttl_ms
        result = self._shards.bulk_write([UpdateOne(_renewable(claim), {"$set": {"lease_until": until}}) for claim in claims], ordered=False)
        return int(result.matched_count)

    def hand_off_all(self, claims: Sequence[Claim]) -> int:
        """`hand_off` for a bundle's claims it will not run now, in one round trip: a started
        one's attempt is given back, a claim not started (`bundle_claim` set) had none counted.
        Returns how many were handed off."""
        if not claims:
            return 0
        unstarted = {"$set": {"lease_until": 0}, "$inc": {"hand_offs": 1}}
        result = self._shards.bulk_write(
            [UpdateOne(_held(claim), unstarted if claim.shard.get("bundle_claim") else _HAND_OFF) for claim in claims], ordered=False
        )
        return int(result.matched_count)

    def finish_all(self, batches: Sequence["OneBatch"]) -> tuple[set[str], set[str]]:
        """A bundle's one-batch shards, each fresh (nothing committed before) and done in one batch:
        commit each one's only batch and mark it SUCCEEDED, for all of them in two round trips
        (unordered bulks of `commit`'s and `succeed`'s fenced updates) where one by one takes two
        per shard. Returns (keys of the shards that ended SUCCEEDED here, keys of those whose job
        was cancelled: not committed, for the caller to cancel); another worker holds the others
        now (a fenced write; their batch's records are stored, never counted twice).

        A fresh checkpoint's counters are all 0 (only a commit moves them, and it counts the batch
        too), so each shard's totals are its batch's counts: `succeed` needs no read back. A
        claim not adopted yet (a first claim: `claim_waiting`) adopts its checkpoint in its commit:
        conditional on an older token instead of its own, and writing its token."""
        if not batches:
            return set(), set()
        now = clock.utcnow()
        commits = [
            UpdateOne(
                {
                    "_id": b.claim.checkpoint_id, "batches": 0, **NOT_CANCELLED, **_same_submission(b.claim.shard),
                    "fencing_token": b.claim.token if b.claim.adopted else {"$lt": b.claim.token},
                },
                {
                    "$set": {
                        "cursor": b.cursor, "updated_at": now, "position": b.position, "done": True, "fencing_token": b.claim.token,
                        "taken_by": self._worker_id,
                    },
                    "$inc": b.counters(),
                },
            )
            for b in batches
        ]
        result = self._checkpoints.bulk_write(commits, ordered=False)
        committed, cancelled = list(batches), set()
        if result.matched_count < len(batches):  # some were fenced or cancelled: find which commits landed
            by_id = {b.claim.checkpoint_id: b for b in batches}
            stored = list(
                self._checkpoints.find({"_id": {"$in": list(by_id)}}, {"fencing_token": 1, "batches": 1, "cancel_requested": 1, "job_created_at_ms": 1})
            )
            landed = {c["_id"] for c in stored if _holds(by_id[c["_id"]].claim, c) and c.get("fencing_token") == by_id[c["_id"]].claim.token and c.get("batches") == 1}
            # Refused for the cancel, not for a newer holder: the checkpoint holds this claim's
            # token, or (not adopted yet) no newer one.
            held = [c for c in stored if _holds(by_id[c["_id"]].claim, c)]
            cancelled = {by_id[c["_id"]].claim.shard_key for c in held if c["_id"] not in landed and c.get("cancel_requested")}
            committed = [b for b in batches if b.claim.checkpoint_id in landed]
        if not committed:
            return set(), cancelled
        finished = {"finished_at": now, "taken_by": None, "ran_by": self._worker_id, "state": ShardState.SUCCEEDED}
        result = self._shards.bulk_write(
            [UpdateOne(_held(b.claim), {"$set": {**finished, "totals": b.counters()}}) for b in committed], ordered=False
        )
        if result.matched_count == len(committed):
            return {b.claim.shard_key for b in committed}, cancelled
        by_key = {b.claim.shard_key: b.claim for b in committed}
        return {
            s["shard_key"]
            for s in self._shards.find({"_id": {"$in": list(by_key)}}, {"shard_key": 1, "fencing_token": 1, "state": 1, "job_created_at_ms": 1})
            if s.get("state") == ShardState.SUCCEEDED and _is_held_by(s, by_key[s["shard_key"]])
        }, cancelled

    def claim_next(self, job_id: str) -> Claim | None:
        """Lease frontier: take the job's first claimable work item (a RETRY item once it is due).

        Items are handed out in index order by a counter on the job (`frontier_next`, one `$inc`
        per `frontier_block` items), each taken by `claim`; once the counter has passed the last
        item, the job's items are read (by the `job_id` index) for what is claimable again: due
        retries, expired leases, items a replay reopened, items another process took from the
        counter and never ran."""
        while (index := self._next_index(job_id)) is not None:
            if (claim := self.claim(shard_key_for(job_id, index))) is not None:
                return claim
        now_ms = clock.now_ms()
        # Only unfinished items can be claimable: at the end of a job that is a few of its
        # thousands, and every lane reads them once (the ended ones are not sent back).
        unfinished = {"job_id": job_id, "state": {"$in": [ShardState.PLANNED, ShardState.QUEUED, ShardState.RETRY, ShardState.RUNNING]}}
        for shard in self._shards.find(unfinished, _CLAIM_FIELDS).sort("index", 1):
            if claimable(shard, now_ms, due_only=True) and (claim := self.claim(shard["shard_key"])) is not None:
                return claim
        return None

    def take_block(self, job_id: str, size: int | None = None) -> list[str]:
        """Lease frontier: the keys of this process's next block of items, in index order: what
        is left of its current block, else `size` (default `frontier_block`) indexes from the
        job's counter (one `$inc`). [] once the counter is past the last item (or there is no
        counter here, no such job, or it is not planned yet). Items taken and never claimed stay
        claimable: `claim_next`'s scan past the counter finds them."""
        with self._taken_lock:
            taken = self._taken.pop(job_id, None)
        block = taken or self._counter_block(job_id, size or self._frontier_block)
        return [shard_key_for(job_id, index) for index in block]

    def _next_index(self, job_id: str) -> int | None:
        """The next item index for this process: from its block, else from a new block of the job's
        frontier counter (None: the counter is past the last item, or there is no counter here,
        no such job, or it is not planned yet)."""
        with self._taken_lock:
            if taken := self._taken.get(job_id):
                return taken.pop(0)
            self._taken.pop(job_id, None)
        block = self._counter_block(job_id, self._frontier_block)
        if not block:
            return None
        with self._taken_lock:
            self._taken.setdefault(job_id, []).extend(block[1:])
        return block[0]

    def _counter_block(self, job_id: str, size: int) -> list[int]:
        """`size` item indexes from the job's frontier counter (those below its shard count)."""
        if self._jobs is None:
            return []
        job = self._jobs.find_one_and_update(
            {"_id": job_id}, {"$inc": {"frontier_next": size}}, projection={"frontier_next": 1, "shard_count": 1},
            return_document=ReturnDocument.AFTER,
        )
        if job is None or not job.get("shard_count"):
            return []
        return list(range(int(job["frontier_next"]) - size, min(int(job["frontier_next"]), int(job["shard_count"]))))

    def _moved(self, shard: dict[str, Any]) -> bool:
        """Whether the shard changed since it was read (so a failed compare-and-set may be retried)."""
        now = self._shards.find_one({"_id": shard["shard_key"]}, _CLAIM_FIELDS)
        return now is not None and _as_read(now) != _as_read(shard)

    def _claim(self, query: dict[str, Any], now_ms: int, sort: list[tuple[str, int]] | None = None) -> Claim | None:
        now = clock.utcnow()
        # `bundle_claim`: None here; a bundle's claim (`claim_waiting`) tags what it took with its own id.
        # `QUEUED_TASK` None: a shard claimed alone is a task of its own for fair dispatch, not part
        # of the bundle or frontier block it was once claimed with (two lanes taking items of one
        # old block would count as one task).
        taken = {
            "state": ShardState.RUNNING, "taken_by": self._worker_id, "lease_until": now_ms + self._ttl_ms, "started_at": now,
            "bundle_claim": None, QUEUED_TASK: None,
        }
        before = self._shards.find_one_and_update(
            query,
            {"$set": taken, "$inc": {"fencing_token": 1, "attempts": 1}},
            sort=sort,
            return_document=ReturnDocument.BEFORE,  # tells whether an expired lease was taken over
        )
        if before is None:
            return None
        shard = {**before, **taken, "fencing_token": int(before["fencing_token"]) + 1, "attempts": int(before["attempts"]) + 1}
        # A handed-off lease (lease_until 0) was given up, not lost: taking it is no reclaim.
        reclaimed = before["state"] == ShardState.RUNNING and bool(before.get("lease_until"))
        if reclaimed:
            metrics.LEASE_TAKEOVERS.inc()
            logger.warning("shard %s: took over the expired lease of %s", before["shard_key"], before.get("taken_by"))
        shard_key = shard["shard_key"]
        token = int(shard["fencing_token"])
        # Adopt the checkpoint: from now on only writes carrying this token move it.
        try:
            checkpoint = self._checkpoints.find_one_and_update(
                {"_id": checkpoint_id(shard_key), "fencing_token": {"$lt": token}, **_same_submission(before)},
                {"$set": {"fencing_token": token, "taken_by": self._worker_id}},
                return_document=ReturnDocument.AFTER,
            )
        except ConnectionFailure as error:
            # The shard is ours (RUNNING, this token) but its checkpoint unknown: the caller hands
            # the lease back once the store answers, so the retry need not wait for it to expire.
            raise StoreUnavailable(error, Claim(shard=shard, token=token, cursor=None, reclaimed=reclaimed)) from error
        if checkpoint is None:
            logger.warning("shard %s: checkpoint held by a newer token than %d", shard_key, token)
            return None
        return Claim(
            shard=shard,
            token=token,
            cursor=checkpoint.get("cursor"),
            reclaimed=reclaimed,
            checkpoint_id=checkpoint["_id"],
            fresh=not int(checkpoint.get("batches") or 0),
            done=bool(checkpoint.get("done")),
            batches=int(checkpoint.get("batches") or 0),
        )

    def renew(self, claim: Claim) -> bool:
        result = self._shards.update_one(_renewable(claim), {"$set": {"lease_until": clock.now_ms() + self._ttl_ms}})
        return result.matched_count == 1

    def taken_over(self, claim: Claim) -> bool:
        """Whether a newer claim holds the shard (not merely: this run finished or handed off)."""
        shard = self._shards.find_one({"_id": claim.shard_key}, {"fencing_token": 1})
        return shard is not None and int(shard["fencing_token"]) > claim.token

    def cancel_requested(self, claim: Claim) -> bool:
        """Whether the shard's job was cancelled (read from the shard, not the checkpoint)."""
        shard = self._shards.find_one({"_id": claim.shard_key}, {"cancel_requested": 1})
        return bool(shard and shard.get("cancel_requested"))

    def commit(
        self, claim: Claim, cursor: Any, records: int, counts: WriteCounts, *, position: int | None = None, done: bool = False
    ) -> "Commit":
        """Record a stored batch: its cursor (JSON) and position (space units, optional), `records` read and the sink's `counts` (added to the
        checkpoint's write counters; `stored` is False if another worker holds the shard now) and
        learn, in the same round trip (a find_one_and_update that
        returns the checkpoint's `cancel_requested`), whether the job was cancelled meanwhile."""
        after = self._checkpoints.find_one_and_update(
            {"_id": claim.checkpoint_id or checkpoint_id(claim.shard_key), "fencing_token": claim.token, **_same_submission(claim.shard)},
            {
                # `cursor` is the pipeline's (any JSON value); `position`, when it says one, the
                # progress in space units that the job's percent done is computed from.
                # `done`: the pipeline said this batch ends the shard (a resumed run stops there).
                "$set": {
                    "cursor": cursor,
                    "updated_at": clock.utcnow(),
                    **({"position": position} if position is not None else {}),
                    **({"done": True} if done else {}),
                },
                "$inc": {"records_done": records, **counts.as_checkpoint_inc(), "batches": 1},
            },
            projection={"cancel_requested": 1, **dict.fromkeys(CHECKPOINT_COUNTERS, 1)},
            return_document=ReturnDocument.AFTER,
        )
        if after is None:
            return Commit(stored=False)
        totals = {counter: int(after.get(counter) or 0) for counter in CHECKPOINT_COUNTERS}
        return Commit(stored=True, cancel_requested=bool(after.get("cancel_requested")), totals=totals)

    def succeed(self, claim: Claim, totals: dict[str, int] | None = None) -> bool:
        """SUCCEEDED, fenced. `totals`: the checkpoint's counters as this run's last commit left
        them (`Commit.totals`), kept on the shard for its counting (cairn_runtime.tally); None
        (no commit in this run: it resumed a shard whose last batch was committed) clears them,
        so the counting reads the checkpoint."""
        return self._finish(claim, {"state": ShardState.SUCCEEDED, "totals": totals})

    def cancel(self, claim: Claim) -> bool:
        """Stop here for a cancel: CANCELLED, fenced, at a batch boundary (the checkpoint stays)."""
        return self._finish(claim, {"state": ShardState.CANCELLED, "cancelled_at_ms": clock.now_ms()})

    def fail(self, claim: Claim, error: str, dead_letter_id: str) -> bool:
        return self._finish(claim, {"state": ShardState.FAILED, "last_error": error, "dead_letter_id": dead_letter_id})

    def schedule_retry(self, claim: Claim, error: str, retry_at: datetime, extra: dict[str, Any] | None = None) -> bool:
        """`extra`: more fields set in the same fenced write (the retry record, see retry.py)."""
        return self._finish(
            claim,
            {
                "state": ShardState.RETRY,
                "last_error": error,
                "next_retry_at": retry_at,
                "next_retry_at_ms": clock.to_ms(retry_at),
                "lease_until": None,
                **(extra or {}),
            },
        )

    def hand_off(self, claim: Claim) -> bool:
        """End this run's lease now, keeping the shard RUNNING: the continuation task (or any
        runner) may claim it at once, and if none is sent the reaper finds an expired lease.
        A handed-off run is not a failed attempt, so the claim's attempt is given back."""
        result = self._shards.update_one(_held(claim), _HAND_OFF)
        return result.matched_count == 1

    def note_fenced_write(self, claim: Claim) -> None:
        """Count a write refused because a newer holder took the shard (evidence for operators)."""
        self._shards.update_one({"_id": claim.shard_key}, {"$inc": {"fenced_writes": 1}})

    def _finish(self, claim: Claim, fields: dict[str, Any]) -> bool:
        result = self._shards.update_one(
            _held(claim),
            # `ran_by` keeps who ran it last once the lease is released (GET /v1/results lists it).
            {"$set": {**fields, "finished_at": clock.utcnow(), "taken_by": None, "ran_by": self._worker_id}},
        )
        return result.matched_count == 1


class Heartbeat:
    """Renews a claim's lease in the background; `lost` turns true once it stops renewing.

    It stops for good when a renewal is refused (another holder, a hand-off, or the job's cancel:
    `cancel_seen` is then set too), and when the batch in flight has run longer than
    `batch_time_limit_s` (`overran`): a read that hangs must not keep its lease alive forever, so
    the lease expires and the scheduler's reaper (or the operator's cancel) takes the shard back.
    The runner marks each batch with `batch_started` / `batch_finished`.
    """

    def __init__(self, leases: ShardLeases, claim: Claim, interval_s: float, batch_time_limit_s: float | None = None) -> None:
        self._leases = leases
        self._claim = claim
        self._interval_s = interval_s
        self._batch_time_limit_s = batch_time_limit_s
        self._batch_started: float | None = None
        self._stopped = threading.Event()
        self.lost = threading.Event()
        self.cancel_seen = threading.Event()
        self.overran = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.shard_key}", daemon=True)

    def batch_started(self) -> None:
        self._batch_started = time.monotonic()

    def batch_finished(self) -> None:
        self._batch_started = None

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval_s + 5)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            started = self._batch_started
            if self._batch_time_limit_s is not None and started is not None:
                running_s = time.monotonic() - started
                if running_s > self._batch_time_limit_s:
                    logger.error(
                        "shard %s: batch running for %.1f s, past its %.1f s bound; lease no longer renewed",
                        self._claim.shard_key, running_s, self._batch_time_limit_s,
                    )
                    self.overran.set()
                    self.lost.set()
                    return
            try:
                if not self._leases.renew(self._claim):
                    if self._leases.taken_over(self._claim):
                        # The renewal was a late write refused by the fencing token.
                        self._leases.note_fenced_write(self._claim)
                        logger.warning("shard %s: lease lost (token %d)", self._claim.shard_key, self._claim.token)
                    elif self._leases.cancel_requested(self._claim):
                        logger.info("shard %s: job cancelled; lease no longer renewed", self._claim.shard_key)
                        self.cancel_seen.set()
                    self.lost.set()
                    return
            except Exception:  # a store hiccup: keep trying until the lease really expires
                logger.exception("shard %s: heartbeat failed", self._claim.shard_key)


class HeldLeases:
    """Keeps alive the leases of a bundle's claims that have not started yet (one `renew_all`
    per interval), so a shard waiting its turn behind slower ones is not taken for dead. A claim
    leaves it when its run starts (`started`): its own Heartbeat renews it from then on.
    `waiting()` lists the claims not started (handed off when the bundle ends early).

    The shards read whole together (`runner.run_in_one_batch`) stay here during that batch, which
    `in_batch()` brackets and `lap()` marks at each step (each shard's read, the merged write):
    one step running past `batch_time_limit_s` (a hung read or write) stops renewing for good, as
    a single shard's Heartbeat stops, so the leases expire and other workers take the shards over
    while this task waits for its soft time limit (their fenced writes refuse it then)."""

    def __init__(self, leases: ShardLeases, claims: Sequence[Claim], interval_s: float, batch_time_limit_s: float | None = None) -> None:
        self._leases = leases
        self._waiting = {claim.shard_key: claim for claim in claims}
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._batch_time_limit_s = batch_time_limit_s
        self._batch_since: float | None = None  # time.monotonic() the merged batch's current step began
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-leases", daemon=True)

    @contextmanager
    def in_batch(self) -> Iterator[None]:
        """Bracket the merged batch: its time counts against `batch_time_limit_s`."""
        self._batch_since = time.monotonic()
        try:
            yield
        finally:
            self._batch_since = None

    def lap(self) -> None:
        """The merged batch's next step begins (a shard's read, the merged write): the limit
        applies to each step, as it does to each batch of a single shard."""
        if self._batch_since is not None:
            self._batch_since = time.monotonic()

    def overran(self) -> bool:
        """Whether the merged batch's current step has run past `batch_time_limit_s` (renewing has stopped)."""
        since, limit = self._batch_since, self._batch_time_limit_s
        return since is not None and limit is not None and time.monotonic() - since > limit

    def started(self, claim: Claim) -> None:
        """The claim's run began: its own Heartbeat renews it from now on."""
        with self._lock:
            self._waiting.pop(claim.shard_key, None)

    def update(self, claim: Claim) -> None:
        """Keep this version of a claim still waiting (its attempt counted: `ShardLeases.start_all`)."""
        with self._lock:
            if claim.shard_key in self._waiting:
                self._waiting[claim.shard_key] = claim

    def waiting(self) -> list[Claim]:
        with self._lock:
            return list(self._waiting.values())

    def __enter__(self) -> "HeldLeases":
        if self._waiting:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 5)

    def _run(self) -> None:
        warned = False
        while not self._stopped.wait(self._interval_s):
            if not (claims := self.waiting()):
                continue
            if warned or self.overran():  # given up for good, as a Heartbeat does: never renewed again
                if not warned:
                    logger.warning("a bundle's batch ran past %.0f s: %d lease(s) no longer renewed", self._batch_time_limit_s, len(claims))
                    warned = True
                continue
            try:
                self._leases.renew_all(claims)
            except Exception:  # a store hiccup: the next round tries again before the leases expire
                logger.exception("renewing the leases of %d waiting bundle shard(s) failed", len(claims))
