"""Replay and discard of recorded dead letters, and the settling of replays in flight.

A replay is a chain of conditional single-document updates, each safe to repeat, so a command
redelivered after a crash continues where it stopped:

1. the entry: `open` → `replaying` with this command's id (one `find_one_and_update`); a second
   command for an entry that is not `open` is refused, so the work never runs twice at once;
2. the shard: `FAILED` (failed by this entry) → `QUEUED`, attempts reset to 0 (a fresh budget;
   the spent attempts are kept in `attempts_before_replays`); its checkpoint is untouched, so
   the work resumes where it stopped;
3. the job: `FAILURE` → `STARTED` (the scheduler's roll-up only touches unfinished jobs; from
   here it derives the job's state from its shards again), and its cached status is dropped;
4. the shard's Celery task is sent, confirmed by the broker (else the command is requeued).

Each command's own outcome (dispatched, discarded, refused and why, already_done) is recorded in
`dlq_commands` by its command_id, where the gateway serves it (GET /dlq/commands/{id}); the first
outcome recorded stands (a redelivery does not rewrite it), and the entry's `pending_command`
claim the gateway set for it is released.

The replay's outcome is derived from the shard, never from an event's payload: when the shard is
`SUCCEEDED` the entry is `replayed`/`succeeded`; when it failed again (a new dead letter, a new
entry) it is `replayed`/`failed_again` with `superseded_by` naming the new entry. Shard events
trigger settling promptly; a periodic pass settles whatever an event did not.
"""

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.messages import DeadLetterCommand, ShardFinished
from cairn_contracts.states import TERMINAL_SHARD_STATES, WAITING_SHARD_STATES, DeadLetterStatus, JobState, ReplayOutcome, ShardState
from cairn_contracts.store import DEFAULT_TENANT, DLQ_COMMANDS, JOBS, QUEUED_TASK, SHARDS, TASK_ERRORS
from cairn_dlq_handler.metrics import REPLAY_COMMANDS, REPLAY_OUTCOMES
from cairn_runtime import tally
from cairn_runtime.celery_config import ShardDispatcher, task_for_shard
from cairn_runtime.consumer import Unprocessable

logger = logging.getLogger(__name__)


class StatusCache(Protocol):
    async def forget(self, tenant: str, job_id: str) -> None: ...


class NotReplayable(Exception):
    """The entry or its shard is not in a state a replay can start from."""


@dataclass(frozen=True)
class DeadLetterCommands:
    db: AsyncDatabase
    dispatcher: ShardDispatcher
    cache: StatusCache | None = None

    # --- commands -------------------------------------------------------------------------------
    async def handle(self, command: DeadLetterCommand) -> None:
        try:
            result = await (self.replay(command) if command.action == "replay" else self.discard(command))
        except Unprocessable as error:
            await self._record(command, "refused", str(error))
            raise
        if result != "refused":  # a refusal was recorded with its reason where it was decided
            await self._record(command, result)
        REPLAY_COMMANDS.labels(command.action, result).inc()

    async def replay(self, command: DeadLetterCommand) -> str:
        """Start (or, for a redelivered command, continue) the replay of one entry."""
        entries = self.db[TASK_ERRORS]
        entry = await entries.find_one({"_id": command.dead_letter_id})
        if entry is None:
            raise Unprocessable(f"no dead letter {command.dead_letter_id}")
        mine = (entry.get("replay") or {}).get("command_id") == command.command_id
        if mine and entry["status"] != DeadLetterStatus.REPLAYING:
            return "already_done"  # a redelivery of a replay that has finished since
        if not mine:
            if entry["status"] != DeadLetterStatus.OPEN or not entry.get("shard_key") or not entry.get("job_id"):
                return await self._refuse(entry, command, "not replayable" if entry["status"] == DeadLetterStatus.OPEN else f"entry is {entry['status']}")
            entry = await entries.find_one_and_update(
                {"_id": entry["_id"], "status": DeadLetterStatus.OPEN},
                {"$set": {"status": DeadLetterStatus.REPLAYING, "replay": _replay_record(command)}},
                return_document=ReturnDocument.AFTER,
            )
            if entry is None:  # another command won the entry a moment ago
                return await self._refuse(await entries.find_one({"_id": command.dead_letter_id}) or {}, command, "entry was just taken by another command")
        try:
            shard = await self._reopen_shard(entry, command)
        except NotReplayable as refusal:
            await self._close(entry, ReplayOutcome.REFUSED, note=str(refusal), status=DeadLetterStatus.OPEN)
            logger.warning("replay of %s refused: %s", entry["_id"], refusal)
            await self._record(command, "refused", str(refusal))
            return "refused"
        job = await self._reopen_job(shard["job_id"])
        # Take the reopened shard out of its job's counters (they counted it FAILED): when it
        # ends again it is counted afresh (cairn_runtime.tally; idempotent on a redelivery).
        await tally.count_shard(self.db, shard["shard_key"])
        await self.dispatcher.dispatch(task_for_shard(shard), int(shard.get("priority") or 2))
        await entries.update_one(
            {"_id": entry["_id"], "status": DeadLetterStatus.REPLAYING, "replay.command_id": command.command_id},
            {"$set": {"replay.dispatched_at_ms": clock.now_ms()}, "$inc": {"replay.dispatches": 1}},
        )
        logger.info(
            "replaying %s (shard %s, job %s now %s) for %s",
            entry["_id"], shard["shard_key"], shard["job_id"], (job or {}).get("state"), command.requested_by,
        )
        await self.settle(entry["_id"])  # a shard that finished before we got here
        return "dispatched"

    async def discard(self, command: DeadLetterCommand) -> str:
        entries = self.db[TASK_ERRORS]
        discard = {
            "command_id": command.command_id,
            "requested_by": command.requested_by,
            "api_key_id": command.api_key_id,
            "requested_at": clock.iso(command.requested_at),
            "at_ms": clock.now_ms(),
            "note": command.note,
        }
        done = await entries.find_one_and_update(
            {"_id": command.dead_letter_id, "status": DeadLetterStatus.OPEN},
            {"$set": {"status": DeadLetterStatus.DISCARDED, "discard": discard}},
        )
        if done is not None:
            logger.info("dead letter %s discarded by %s", command.dead_letter_id, command.requested_by)
            return "discarded"
        entry = await entries.find_one({"_id": command.dead_letter_id})
        if entry is None:
            raise Unprocessable(f"no dead letter {command.dead_letter_id}")
        if (entry.get("discard") or {}).get("command_id") == command.command_id:
            return "already_done"
        return await self._refuse(entry, command, f"entry is {entry['status']}")

    # --- settling --------------------------------------------------------------------------------
    async def shard_finished(self, event: ShardFinished) -> None:
        async for entry in self.db[TASK_ERRORS].find({"shard_key": event.shard_key, "status": DeadLetterStatus.REPLAYING}, {"_id": 1}):
            await self.settle(entry["_id"])

    async def settle_all(self) -> int:
        settled = 0
        async for entry in self.db[TASK_ERRORS].find({"status": DeadLetterStatus.REPLAYING}, {"_id": 1}):
            settled += int(await self.settle(entry["_id"]) is not None)
        return settled

    async def settle(self, entry_id: str) -> ReplayOutcome | None:
        """Close a replaying entry whose shard has finished; None while it has not."""
        entry = await self.db[TASK_ERRORS].find_one({"_id": entry_id, "status": DeadLetterStatus.REPLAYING})
        if entry is None:
            return None
        shard = await self.db[SHARDS].find_one({"_id": entry["shard_key"]})
        if shard is None or shard.get("replay_command_id") != entry["replay"]["command_id"]:
            return None  # not reopened by this replay yet
        if shard["state"] == ShardState.SUCCEEDED:
            outcome, superseded_by = ReplayOutcome.SUCCEEDED, None
        elif shard["state"] == ShardState.FAILED and shard.get("dead_letter_id") not in (None, entry_id):
            outcome, superseded_by = ReplayOutcome.FAILED_AGAIN, shard["dead_letter_id"]
        else:
            return None
        if await self._close(entry, outcome, superseded_by=superseded_by):
            logger.info("replay of %s ended: %s", entry_id, outcome)
            REPLAY_OUTCOMES.labels(str(outcome)).inc()
            await self._repair_job(shard["job_id"])
            await tally.count_shard(self.db, shard["shard_key"])  # its end, if the job was finished when it came
        return outcome

    # --- steps -----------------------------------------------------------------------------------
    async def _reopen_shard(self, entry: dict[str, Any], command: DeadLetterCommand) -> dict[str, Any]:
        shards = self.db[SHARDS]
        shard = await shards.find_one({"_id": entry["shard_key"]})
        if shard is None:
            raise NotReplayable(f"shard {entry['shard_key']} is not recorded")
        if shard.get("replay_command_id") == command.command_id:
            return shard  # reopened by this very command before a crash or a failed dispatch
        job = await self.db[JOBS].find_one({"_id": shard["job_id"]}, {"state": 1, "cancel_requested": 1})
        if job is not None and (job.get("state") == JobState.CANCELLED or job.get("cancel_requested")):
            raise NotReplayable(f"job {shard['job_id']} is cancelled")
        now_ms = clock.now_ms()
        marks = {"replay_of": entry["_id"], "replay_command_id": command.command_id, "queued_at_ms": now_ms}
        if shard["state"] == ShardState.FAILED and shard.get("dead_letter_id") == entry["_id"]:
            reopened = await shards.find_one_and_update(
                {
                    "_id": shard["_id"],
                    "state": ShardState.FAILED,
                    "dead_letter_id": entry["_id"],
                    "attempts": shard.get("attempts", 0),
                },
                {
                    "$set": {
                        **marks,
                        "state": ShardState.QUEUED,
                        QUEUED_TASK: None,  # sent on its own: fair dispatch counts it alone
                        "attempts": 0,  # a fresh attempt budget; the spent ones are counted below
                        "lease_until": None,
                        "taken_by": None,
                        "retries": [],
                        "retry": None,
                        "replayed_at_ms": now_ms,
                    },
                    "$inc": {"replays": 1, "attempts_before_replays": int(shard.get("attempts", 0))},
                },
                return_document=ReturnDocument.AFTER,
            )
        elif entry.get("kind") == "broker" and shard["state"] in WAITING_SHARD_STATES:
            # The broker dead-lettered the task of a shard that is still waiting for it: send it again.
            reopened = await shards.find_one_and_update(
                {"_id": shard["_id"], "state": shard["state"]},
                {"$set": marks},
                return_document=ReturnDocument.AFTER,
            )
        else:
            raise NotReplayable(
                f"shard {shard['shard_key']} is {shard['state']}"
                + ("" if shard.get("dead_letter_id") in (None, entry["_id"]) else f" (its failure is now {shard['dead_letter_id']})")
            )
        if reopened is None:  # it moved meanwhile; look again (maybe it was us)
            return await self._reopen_shard(entry, command)
        return reopened

    async def _reopen_job(self, job_id: str) -> dict[str, Any] | None:
        job = await self.db[JOBS].find_one_and_update(
            {"_id": job_id, "state": JobState.FAILURE},
            {
                "$set": {"state": JobState.STARTED, "reopened_at_ms": clock.now_ms()},
                "$unset": {"finished_at": "", "result": ""},
                "$inc": {"reopens": 1},
            },
            return_document=ReturnDocument.AFTER,
        )
        if job is None:
            return await self.db[JOBS].find_one({"_id": job_id}, {"state": 1, "tenant": 1})
        logger.info("job %s reopened by a replay", job_id)
        if self.cache is not None:
            await self.cache.forget(job.get("tenant") or DEFAULT_TENANT, job_id)
        return job

    async def _repair_job(self, job_id: str) -> None:
        """Reopen a job whose FAILURE no longer matches its shards (no shard failed any more, or
        one runs again): it can be left so when the scheduler's roll-up read the shards just before
        a replay reopened one. Reopened, it is rolled up from its shards again."""
        job = await self.db[JOBS].find_one({"_id": job_id}, {"state": 1})
        if job is None or job["state"] != JobState.FAILURE:
            return
        states = {s["state"] async for s in self.db[SHARDS].find({"job_id": job_id}, {"state": 1})}
        if ShardState.FAILED not in states or states - TERMINAL_SHARD_STATES:
            await self._reopen_job(job_id)

    async def _close(
        self,
        entry: dict[str, Any],
        outcome: ReplayOutcome,
        *,
        superseded_by: str | None = None,
        note: str | None = None,
        status: DeadLetterStatus = DeadLetterStatus.REPLAYED,
    ) -> bool:
        replay = {**entry["replay"], "outcome": outcome, "finished_at_ms": clock.now_ms()}
        if superseded_by:
            replay["superseded_by"] = superseded_by
        if note:
            replay["note"] = note
        history = [r for r in entry.get("replays") or [] if isinstance(r, dict)]
        fields: dict[str, Any] = {"status": status, "replay": replay, "replays": [*history, replay]}
        if superseded_by:
            fields["superseded_by"] = superseded_by
        result = await self.db[TASK_ERRORS].update_one(
            {"_id": entry["_id"], "status": DeadLetterStatus.REPLAYING, "replay.command_id": replay["command_id"]},
            {"$set": fields},
        )
        return result.matched_count == 1

    async def _refuse(self, entry: dict[str, Any], command: DeadLetterCommand, why: str) -> str:
        logger.warning(
            "%s of dead letter %s requested by %s refused: %s",
            command.action, command.dead_letter_id, command.requested_by, why,
        )
        if entry.get("_id"):
            await self.db[TASK_ERRORS].update_one({"_id": entry["_id"]}, {"$inc": {f"{command.action}s_refused": 1}})
        await self._record(command, "refused", why)
        return "refused"

    async def _record(self, command: DeadLetterCommand, outcome: str, detail: str | None = None) -> None:
        """Record what this command did (by command_id) and release the entry's claim for it."""
        try:
            await self.db[DLQ_COMMANDS].update_one(
                {"_id": command.command_id, "status": {"$ne": "done"}},
                {
                    "$set": {"status": "done", "outcome": outcome, "detail": detail, "finished_at_ms": clock.now_ms()},
                    "$setOnInsert": {
                        "action": command.action,
                        "dead_letter_id": command.dead_letter_id,
                        "requested_by": command.requested_by,
                        "api_key_id": command.api_key_id,
                        "requested_at_ms": clock.to_ms(command.requested_at),
                    },
                },
                upsert=True,
            )
        except DuplicateKeyError:
            pass  # handled before (this is a redelivery): the first outcome stands
        await self.db[TASK_ERRORS].update_one(
            {"_id": command.dead_letter_id, "pending_command.command_id": command.command_id}, {"$unset": {"pending_command": ""}}
        )


def _replay_record(command: DeadLetterCommand) -> dict[str, Any]:
    return {
        "command_id": command.command_id,
        "requested_by": command.requested_by,
        "api_key_id": command.api_key_id,
        "requested_at": clock.iso(command.requested_at),
        "requested_at_ms": clock.to_ms(command.requested_at),
        "started_at_ms": clock.now_ms(),
        "note": command.note,
        "dispatches": 0,
    }

