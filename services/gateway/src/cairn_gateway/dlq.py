"""Inspect and act on the dead-letter queue's record (task_errors).

Reads answer from MongoDB. Replay and discard are commands to the DLQ handler, published with a
confirm. Before publishing, the gateway claims the entry for the command (one conditional update:
the entry is `open` and holds no other command not yet handled), so a second replay or discard
of an entry whose outcome is already known answers 409 instead of a 202 the handler would
refuse: 404 unknown, 409 not open or a command pending. The DLQ handler's own conditional updates
are still what make a replay happen at most once at a time.

Each command is recorded in `dlq_commands` by its id (`pending`); the DLQ handler records its
outcome there (`done`: dispatched, discarded, refused with the reason, already_done), read with
GET /dlq/commands/{command_id}. A command the broker does not confirm is an error for the client
(503): it is recorded `not_published`, the entry's claim is released, nothing changed, and the
request may simply be repeated.
"""

import base64
import logging
import uuid
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.messages import DeadLetterAction, DeadLetterCommand
from cairn_contracts.states import DeadLetterStatus, JobState
from cairn_contracts.store import DEFAULT_TENANT, DLQ_COMMANDS, JOBS, TASK_ERRORS
from cairn_gateway.auth import ALL_TENANTS, tenant_match
from cairn_gateway.dlq_schemas import (
    BulkReplayAccepted,
    BulkReplayRequest,
    CommandAccepted,
    CommandStatus,
    DeadLetterEntry,
    DeadLetterPage,
    DeadLetterSummary,
)
from cairn_gateway.errors import Conflict, NotConfirmed, NotFound
from cairn_gateway.tenants import QuotaExceeded, TenantService
from cairn_runtime.amqp import Publisher, PublishNotConfirmed
from cairn_runtime.payloads import RawPayloads

logger = logging.getLogger(__name__)

_SUMMARY_FIELDS = {
    "stack": 0,
    "original": 0,
    "death_headers": 0,
    "replays": 0,
}


# A command the DLQ handler has not handled this long after it was requested no longer holds its
# entry: the handler may be down with the command queued. A new command may then be published;
# the handler's conditional updates refuse whichever of the two comes second (and record why).
PENDING_COMMAND_STALE_S = 300


class EntryNotFound(NotFound):
    def __init__(self, entry_id: str, detail: str | None = None) -> None:
        super().__init__(detail or f"no dead letter {entry_id}", entry_id)


class CommandNotFound(NotFound):
    def __init__(self, command_id: str) -> None:
        super().__init__(f"no dead-letter command {command_id}", command_id)


class EntryConflict(Conflict):
    """The entry is not in a state the requested action can start from."""


class CommandNotPublished(NotConfirmed):
    """The broker did not confirm the command: nothing was requested (`accepted`: the commands of
    a bulk replay published before it)."""

    def __init__(self, message: str, accepted: list[CommandAccepted] | None = None) -> None:
        super().__init__(message)
        self.accepted = accepted or []


@dataclass(frozen=True)
class EntryFilter:
    job_id: str | None = None
    pipeline: str | None = None
    error_type: str | None = None
    reason: str | None = None
    status: str | None = None
    shard_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def query(self, tenant: str) -> dict[str, Any]:
        # Entries without a tenant (no job, or recorded before tenants) belong to the default one;
        # an operator's view (ALL_TENANTS) is every entry.
        query: dict[str, Any] = tenant_match(tenant) if tenant != DEFAULT_TENANT else {"tenant": {"$in": [tenant, None]}}
        for field in ("job_id", "pipeline", "error_type", "reason", "status", "shard_key"):
            value = getattr(self, field)
            if value is not None:
                query[field] = value
        if self.since is not None or self.until is not None:
            created: dict[str, datetime] = {}
            if self.since is not None:
                created["$gte"] = clock.as_utc(self.since)
            if self.until is not None:
                created["$lt"] = clock.as_utc(self.until)
            query["created_at"] = created  # an insert-time date: compares as a date on every server
        return query


def replayable(entry: dict[str, Any]) -> bool:
    return (
        entry.get("status") == DeadLetterStatus.OPEN
        and isinstance(entry.get("shard_key"), str)
        and isinstance(entry.get("job_id"), str)
    )


@dataclass(frozen=True)
class DeadLetterService:
    db: AsyncDatabase
    publisher: Publisher
    payloads: RawPayloads
    # Quotas: a replay that reopens a FAILED job counts against its tenant's running jobs (None: not checked).
    tenants: TenantService | None = None

    async def list(self, tenant: str, entry_filter: EntryFilter, offset: int, limit: int) -> DeadLetterPage:
        query = entry_filter.query(tenant)
        total = await self.db[TASK_ERRORS].count_documents(query)
        found = (
            self.db[TASK_ERRORS]
            .find(query, _SUMMARY_FIELDS)
            .sort([("created_at", -1), ("_id", -1)])
            .skip(offset)
            .limit(limit)
        )
        items = [DeadLetterSummary.model_validate(_shape(entry)) async for entry in found]
        return DeadLetterPage(
            items=items,
            total=total,
            offset=offset,
            limit=limit,
            next_offset=offset + len(items) if offset + len(items) < total else None,
        )

    async def get(self, tenant: str, entry_id: str) -> DeadLetterEntry:
        return DeadLetterEntry.model_validate(_shape(await self._entry(tenant, entry_id)))

    async def payload(self, tenant: str, entry_id: str) -> tuple[bytes, str]:
        """The original message body, from GridFS when it was kept aside; and its content type."""
        entry = await self._entry(tenant, entry_id)
        original = entry.get("original") or {}
        ref = original.get("payload_ref") or {}
        if ref.get("raw_payload_id"):
            data = await self.payloads.read(ref["raw_payload_id"])
            if data is None:
                raise EntryNotFound(entry_id, f"no payload: {entry_id}: its raw payload is not stored")
            content_type = (await self.payloads.describe(ref["raw_payload_id"]) or {}).get("content_type")
            return data, content_type or "application/octet-stream"
        body = original.get("body")
        if body is None:
            raise EntryNotFound(entry_id, f"no payload: {entry_id}: it holds no original body")
        if original.get("body_encoding") == "base64":
            return base64.b64decode(body), "application/octet-stream"
        return body.encode("utf-8"), "text/plain; charset=utf-8"

    async def request(
        self,
        tenant: str,
        entry_id: str,
        action: DeadLetterAction,
        requested_by: str,
        note: str | None = None,
        api_key_id: str | None = None,
    ) -> CommandAccepted:
        entry = await self._entry(tenant, entry_id)
        if entry.get("status") != DeadLetterStatus.OPEN:
            raise EntryConflict(f"dead letter {entry_id} is {entry.get('status')}; only open entries can be {action}ed")
        if action == "replay" and not replayable(entry):
            raise EntryConflict(f"dead letter {entry_id} names no shard to re-dispatch; it can only be discarded")
        if action == "replay":
            _, refusal = await self._admit([entry])
            if refusal is not None:
                raise refusal
        return await self._publish(tenant, entry, action, requested_by, note, api_key_id)

    async def command(self, tenant: str, command_id: str) -> CommandStatus:
        """What became of a replay or discard command; CommandNotFound for an unknown id."""
        command = await self.db[DLQ_COMMANDS].find_one({"_id": command_id, **EntryFilter().query(tenant)})
        if command is None:
            raise CommandNotFound(command_id)
        entry = await self.db[TASK_ERRORS].find_one({"_id": command["dead_letter_id"]}, {"status": 1, "replay": 1}) or {}
        replay: dict[str, Any] = entry["replay"] if isinstance(entry.get("replay"), dict) else {}
        return CommandStatus(
            command_id=command_id,
            action=command["action"],
            dead_letter_id=command["dead_letter_id"],
            status=command.get("status") or "pending",
            outcome=command.get("outcome"),
            detail=command.get("detail"),
            requested_by=command.get("requested_by"),
            requested_at=clock.from_ms_field(command.get("requested_at_ms")),
            finished_at=clock.from_ms_field(command.get("finished_at_ms")),
            entry_status=entry.get("status"),
            replay_outcome=replay.get("outcome") if replay.get("command_id") == command_id else None,
            entry_url=f"/dlq/entries/{command['dead_letter_id']}",
        )

    async def replay_matching(
        self, tenant: str, request: BulkReplayRequest, requested_by: str, api_key_id: str | None = None
    ) -> BulkReplayAccepted:
        entry_filter = EntryFilter(
            job_id=request.job_id,
            pipeline=request.pipeline,
            error_type=request.error_type,
            reason=request.reason,
            status=DeadLetterStatus.OPEN,
            shard_key=request.shard_key,
            since=request.since,
            until=request.until,
        )
        query = {
            **entry_filter.query(tenant),
            **_no_pending_command(),
            "shard_key": request.shard_key or {"$type": "string"},
            "job_id": request.job_id or {"$type": "string"},
        }
        matched = await self.db[TASK_ERRORS].count_documents(query)
        accepted: list[CommandAccepted] = []
        found = self.db[TASK_ERRORS].find(query, {"_id": 1, "job_id": 1}).sort([("created_at", 1), ("_id", 1)]).limit(request.limit)
        entries, refusal = await self._admit([entry async for entry in found])
        if refusal is not None and not entries:
            raise refusal  # nothing fits: the client learns why, as for one replay
        for entry in entries:
            try:
                accepted.append(await self._publish(tenant, entry, "replay", requested_by, request.note, api_key_id))
            except EntryConflict:
                continue  # taken by another command since it was matched: that one decides
            except CommandNotPublished as error:
                published = ", ".join(c.dead_letter_id for c in accepted)
                raise CommandNotPublished(
                    f"{error}; {len(accepted)} replay command(s) were published before: {published}", accepted
                ) from error
        return BulkReplayAccepted(
            matched=matched,
            published=len(accepted),
            remaining=max(0, matched - len(accepted)),
            held_by_quota=str(refusal) if refusal is not None else None,
            commands=accepted,
        )

    async def _admit(self, entries: Sequence[dict[str, Any]]) -> tuple[Sequence[dict[str, Any]], QuotaExceeded | None]:
        """The entries whose replay fits their tenants' `max_running_jobs`, in order, and the
        refusal of the others (None: all fit). A replay reopens its shard's job if that job FAILED
        (the DLQ handler reopens nothing else): each such job counts as one more unfinished job,
        as do the FAILED jobs replays not handled yet will reopen; entries of a job admitted
        already, or not FAILED, always fit."""
        if self.tenants is None:
            return list(entries), None
        job_ids = sorted({entry["job_id"] for entry in entries if isinstance(entry.get("job_id"), str)})
        failed = {
            job["_id"]: job.get("tenant") or DEFAULT_TENANT
            async for job in self.db[JOBS].find({"_id": {"$in": job_ids}, "state": JobState.FAILURE}, {"tenant": 1})
        }
        rooms: dict[str, int | None] = {}
        admitted_jobs: set[str] = set()
        admitted: MutableSequence[dict[str, Any]] = []  # (`list` is a method of this class)
        refusal: QuotaExceeded | None = None
        for entry in entries:
            job_id = entry.get("job_id")
            if not isinstance(job_id, str) or job_id not in failed or job_id in admitted_jobs:
                admitted.append(entry)
                continue
            tenant = failed[job_id]
            if tenant not in rooms:
                pending = await self._pending_reopens(tenant)
                rooms[tenant] = await self.tenants.room(tenant, len(pending))
                admitted_jobs |= pending  # their replays are counted already
                if job_id in pending:
                    admitted.append(entry)
                    continue
            room = rooms[tenant]
            if room is None or room > 0:
                rooms[tenant] = None if room is None else room - 1
                admitted_jobs.add(job_id)
                admitted.append(entry)
            elif refusal is None:
                refusal = QuotaExceeded(
                    "max_running_jobs",
                    f"a replay of job {job_id} would reopen it, and tenant {tenant!r} has no room for another unfinished job",
                )
        return admitted, refusal

    async def _pending_reopens(self, tenant: str) -> set[str]:
        """The FAILED jobs of the tenant that replay commands not handled yet will reopen."""
        pending = {
            entry["job_id"]
            async for entry in self.db[TASK_ERRORS].find(
                {"tenant": tenant, "pending_command.action": "replay", "pending_command.at_ms": {"$gte": _stale_before()}}, {"job_id": 1}
            )
            if isinstance(entry.get("job_id"), str)
        }
        if not pending:
            return set()
        return {job["_id"] async for job in self.db[JOBS].find({"_id": {"$in": sorted(pending)}, "state": JobState.FAILURE}, {"_id": 1})}

    async def _publish(
        self,
        tenant: str,
        entry: dict[str, Any],
        action: DeadLetterAction,
        requested_by: str,
        note: str | None,
        api_key_id: str | None,
    ) -> CommandAccepted:
        """Claim the entry for a new command, record it `pending`, publish it with a confirm.

        Raises EntryNotFound, EntryConflict (not open, or another command not handled yet) and
        CommandNotPublished (then the claim is released and the command recorded `not_published`).
        """
        command = DeadLetterCommand(
            command_id=uuid.uuid4().hex,
            action=action,
            dead_letter_id=entry["_id"],
            requested_by=requested_by,
            api_key_id=api_key_id,
            note=note,
        )
        now_ms = clock.to_ms(command.requested_at)
        claimed = await self.db[TASK_ERRORS].find_one_and_update(
            {"_id": entry["_id"], "status": DeadLetterStatus.OPEN, **_no_pending_command(now_ms)},
            {"$set": {"pending_command": {"command_id": command.command_id, "action": action, "at_ms": now_ms}}},
            projection={"_id": 1},
        )
        if claimed is None:
            raise await self._conflict(entry["_id"], action)
        await self.db[DLQ_COMMANDS].insert_one(
            {
                "_id": command.command_id,
                # The entry's own tenant when an operator acts across tenants: its admins see it too.
                "tenant": (entry.get("tenant") or DEFAULT_TENANT) if tenant == ALL_TENANTS else tenant,
                "action": action,
                "dead_letter_id": entry["_id"],
                "job_id": entry.get("job_id"),
                "requested_by": requested_by,
                "api_key_id": api_key_id,
                "note": note,
                "requested_at_ms": now_ms,
                "status": "pending",
                "outcome": None,
                "detail": None,
            }
        )
        try:
            await self.publisher.publish(command, correlation_id=entry.get("job_id") or entry["_id"])
        except PublishNotConfirmed as error:
            logger.warning("%s of dead letter %s not confirmed by the broker", action, entry["_id"], exc_info=True)
            await self.db[DLQ_COMMANDS].update_one(
                {"_id": command.command_id}, {"$set": {"status": "not_published", "detail": f"not confirmed by the broker: {error}"}}
            )
            await self.db[TASK_ERRORS].update_one(
                {"_id": entry["_id"], "pending_command.command_id": command.command_id}, {"$unset": {"pending_command": ""}}
            )
            raise CommandNotPublished(f"the {action} command was not confirmed by the broker: {error}") from error
        logger.info("%s of dead letter %s requested by %s (command %s)", action, entry["_id"], requested_by, command.command_id)
        return CommandAccepted(
            command_id=command.command_id,
            action=action,
            dead_letter_id=entry["_id"],
            entry_url=f"/dlq/entries/{entry['_id']}",
            command_url=f"/dlq/commands/{command.command_id}",
        )

    async def _conflict(self, entry_id: str, action: DeadLetterAction) -> Exception:
        """Why an entry could not be claimed for a command, read back after the claim failed."""
        current = await self.db[TASK_ERRORS].find_one({"_id": entry_id}, {"status": 1, "pending_command": 1})
        if current is None:
            return EntryNotFound(entry_id)
        if current.get("status") != DeadLetterStatus.OPEN:
            return EntryConflict(f"dead letter {entry_id} is {current.get('status')}; only open entries can be {action}ed")
        pending = current.get("pending_command") or {}
        return EntryConflict(
            f"dead letter {entry_id} has a {pending.get('action')} command not handled yet "
            f"(GET /dlq/commands/{pending.get('command_id')}); its outcome decides what is next"
        )

    async def _entry(self, tenant: str, entry_id: str) -> dict[str, Any]:
        entry = await self.db[TASK_ERRORS].find_one({"_id": entry_id, **EntryFilter().query(tenant)})
        if entry is None:
            raise EntryNotFound(entry_id)
        return entry


def _shape(entry: dict[str, Any]) -> dict[str, Any]:
    shaped = {key: value for key, value in entry.items() if key != "_id"}
    shaped["id"] = entry["_id"]
    shaped["replayable"] = replayable(entry)
    shaped["replays"] = [r for r in entry.get("replays") or [] if isinstance(r, dict)]
    return shaped


def _no_pending_command(now_ms: int | None = None) -> dict[str, Any]:
    """Entries holding no command that is not handled yet (or only a stale one)."""
    return {"$or": [{"pending_command": None}, {"pending_command.at_ms": {"$lt": _stale_before(now_ms)}}]}


def _stale_before(now_ms: int | None = None) -> int:
    """A command pending since before this (epoch ms) is stale: taken as never handled."""
    return (now_ms if now_ms is not None else clock.now_ms()) - PENDING_COMMAND_STALE_S * 1000

