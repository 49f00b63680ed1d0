"""The TaskDedup ledger behind `RunContext.effects`: one `task_dedup` document per side effect.

Semantics are the SDK's (`cairn_sdk.effects`, exact wording there); this is how they are kept.
A document `{_id: fingerprint, state: "pending"|"done", owner_shard_key, owner_token, lease_until_ms,
result, ...}` is inserted before the call (the unique `_id` makes one run the holder) and set
`done` after it, each step one single-document write:

- found `done`: skip, return the recorded result.
- found `pending`, at_most_once: skip, in doubt (never called a second time).
- found `pending`, at_least_once: the holder's run is over when the entry's shard was claimed
  since (its fencing token is older than ours: that holder's lease expired or it finished) or
  its `lease_until_ms` passed; then this run takes the entry over (a conditional update on the
  old owner: one winner) and calls again. Otherwise `EffectBusy` (retryable).
- the call raised: at_least_once deletes the entry (owner-conditional: not done, the retry calls
  again); at_most_once leaves it pending (in doubt).
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from bson.errors import InvalidDocument
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError
from pymongo.results import UpdateResult

from cairn_contracts import clock
from cairn_sdk.effects import Effect, EffectBusy, Mode, Scope, fingerprint, run_once

logger = logging.getLogger(__name__)
T = TypeVar("T")

PENDING = "pending"
DONE = "done"


class TaskDedupLedger:
    """`cairn_sdk.effects.Effects` over the `task_dedup` collection, for one shard run (its
    claim's `shard_key` and fencing `token`). `lease_s`: how long a pending at_least_once effect
    of another shard is presumed alive (seconds); the same shard's older claims are over at once."""

    def __init__(
        self, collection: Collection, *, tenant: str, job_id: str, shard_key: str, token: int, lease_s: float = 60.0
    ) -> None:
        self._collection = collection
        self._tenant = tenant
        self._job_id = job_id
        # Flat fields, not a sub-document: filters match them on every server (see
        # docs/mongodb-stand-in.md on documents written by updates).
        self._owner: dict[str, Any] = {"owner_shard_key": shard_key, "owner_token": token}
        self._lease_ms = int(lease_s * 1000)

    def fingerprint(self, key: str, scope: Scope = "job") -> str:
        return fingerprint(self._tenant, self._job_id if scope == "job" else None, key)

    def guard(self, key: str, *, scope: Scope = "job", mode: Mode = "at_least_once") -> AbstractContextManager[Effect]:
        return self._guard(key, scope, mode)

    def once(self, key: str, fn: Callable[[], T], *, scope: Scope = "job", mode: Mode = "at_least_once") -> T | Any:
        return run_once(self, key, fn, scope=scope, mode=mode)

    def done(self, key: str, *, scope: Scope = "job") -> bool:
        entry = self._collection.find_one({"_id": self.fingerprint(key, scope)}, {"state": 1})
        return entry is not None and entry.get("state") == DONE

    @contextmanager
    def _guard(self, key: str, scope: Scope, mode: Mode) -> Iterator[Effect]:
        effect = Effect(key, self.fingerprint(key, scope))
        entry = self._hold(effect, scope, mode)
        if entry is not None:  # not ours to call
            effect.skip = True
            effect.in_doubt = entry.get("state") != DONE
            effect.result = entry.get("result")
            if effect.in_doubt:
                logger.warning("effect %r (%s) in doubt: an earlier attempt never recorded its end; at most once: skipped", key, effect.fingerprint)
            yield effect
            return
        try:
            yield effect
        except Exception:  # not GeneratorExit (a guard abandoned unexited) nor a shutdown: the next claim takes over
            if mode == "at_least_once":
                self._collection.delete_one({"_id": effect.fingerprint, "state": PENDING, **self._owner})
            raise
        recorded = self._record_done(effect)
        if not recorded.matched_count:
            # Another run took the entry over while this call ran (this run's lease had lapsed):
            # the external system may have seen the call twice (at least once).
            logger.warning("effect %r (%s) was taken over during the call; its result is not recorded by this run", key, effect.fingerprint)

    def _record_done(self, effect: Effect) -> UpdateResult:
        where = {"_id": effect.fingerprint, "state": PENDING, **self._owner}
        done = {"state": DONE, "done_at_ms": clock.now_ms()}
        try:
            return self._collection.update_one(where, {"$set": {**done, "result": effect.result}})
        except (InvalidDocument, TypeError, OverflowError):
            # The effect happened: it must be recorded done even if its result cannot be stored
            # (a response object): else every retry would call it again.
            logger.warning("effect %r: result of type %s is not storable; recorded as done without it", effect.key, type(effect.result).__name__)
            return self._collection.update_one(where, {"$set": {**done, "result": None, "result_type": type(effect.result).__name__}})

    def _hold(self, effect: Effect, scope: Scope, mode: Mode) -> dict[str, Any] | None:
        """None: this run holds the effect and calls it; else the entry that says why not."""
        now_ms = clock.now_ms()
        try:
            self._collection.insert_one(
                {
                    "_id": effect.fingerprint,
                    "task_fingerprint": effect.fingerprint,
                    "key": effect.key,
                    "scope": scope,
                    "mode": mode,
                    "tenant": self._tenant,
                    "job_id": self._job_id,
                    "state": PENDING,
                    **self._owner,
                    "lease_until_ms": now_ms + self._lease_ms,
                    "attempts": 1,
                    "created_at_ms": now_ms,
                }
            )
            return None
        except DuplicateKeyError:
            pass
        entry = self._collection.find_one({"_id": effect.fingerprint})
        if entry is None:  # deleted since (its call failed): try once more
            return self._hold(effect, scope, mode)
        if entry.get("state") == DONE or mode == "at_most_once":
            return entry
        owner = {name: entry.get(name) for name in self._owner}
        if not (self._holder_is_over(owner) or int(entry.get("lease_until_ms") or 0) < now_ms):
            raise EffectBusy(f"effect {effect.key!r} is being run by shard {owner['owner_shard_key']} (token {owner['owner_token']})")
        taken = self._collection.find_one_and_update(
            {"_id": effect.fingerprint, "state": PENDING, **owner},
            {"$set": {**self._owner, "lease_until_ms": now_ms + self._lease_ms}, "$inc": {"attempts": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if taken is None:
            raise EffectBusy(f"effect {effect.key!r} was taken over by another run meanwhile")
        logger.info("effect %r: taking over from %s (its run is over); calling again (at least once)", effect.key, owner)
        return None

    def _holder_is_over(self, owner: dict[str, Any]) -> bool:
        """The same shard, claimed since by this run: the holder's lease is gone."""
        return owner["owner_shard_key"] == self._owner["owner_shard_key"] and int(owner["owner_token"] or 0) < int(self._owner["owner_token"])
