"""The dead-letter API: list, read, replay and discard what could not succeed.

Replay and discard answer 202 once the DLQ handler's command is confirmed by the broker, and 409
where the outcome is already known (the entry is not open, or another command for it is not
handled yet); GET /dlq/commands/{command_id} tells what the handler did with the command, the
entry (GET /dlq/entries/{id}) how its replay ended. Who asked: the `X-Cairn-Actor` header (an
operator's name), else the API key's name (else its id); the key's id is recorded either way.
"""

import re
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response, status

from cairn_contracts.bounds import Moment
from cairn_gateway.api.deps import Actor, DeadLetters, Viewer
from cairn_gateway.dlq import EntryFilter
from cairn_gateway.dlq_schemas import (
    BulkReplayAccepted,
    BulkReplayRequest,
    CommandAccepted,
    CommandStatus,
    DeadLetterEntry,
    DeadLetterPage,
    DiscardRequest,
    ReplayRequest,
)
from cairn_gateway.errors import Invalid
from cairn_gateway.problems import Problem

router = APIRouter(prefix="/dlq", tags=["dead letters"])
# Far more entries than a page walk ever skips, and well inside MongoDB's 64-bit skip.
MAX_OFFSET = 1_000_000_000


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem}}
COMMAND_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem},
    409: {"model": Problem, "description": "The entry is not open, names no shard to replay, or has a command not handled yet"},
    429: {"model": Problem, "description": "A replay would reopen FAILED jobs beyond the tenant's max_running_jobs quota (bulk: none fits)"},
    503: {"model": Problem, "description": "The broker did not confirm the command; nothing was requested"},
}


@router.get("/entries", response_model=DeadLetterPage)
async def list_entries(
    service: DeadLetters,
    tenant: Viewer,
    job_id: Annotated[str | None, Query(max_length=200)] = None,
    pipeline: Annotated[str | None, Query(max_length=200)] = None,
    error_type: Annotated[str | None, Query(max_length=200)] = None,
    reason: Annotated[str | None, Query(max_length=200)] = None,
    status_: Annotated[str | None, Query(alias="status", pattern="^(open|replaying|replayed|discarded)$")] = None,
    shard_key: Annotated[str | None, Query(max_length=300)] = None,
    since: Annotated[Moment | None, Query(description="Recorded at or after (ISO 8601)")] = None,
    until: Annotated[Moment | None, Query(description="Recorded before (ISO 8601)")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Entries to skip (paging by offset)")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeadLetterPage:
    """Dead-lettered entries, newest first, filtered by every parameter given."""
    entry_filter = EntryFilter(job_id, pipeline, error_type, reason, status_, shard_key, since, until)
    return await service.list(tenant, entry_filter, offset, limit)


@router.get("/entries/{entry_id}", response_model=DeadLetterEntry, responses=NOT_FOUND)
async def get_entry(entry_id: str, service: DeadLetters, tenant: Viewer) -> DeadLetterEntry:
    """One entry in full: error, bounded stack, original message (or its GridFS pointer), replays."""
    return await service.get(tenant, entry_id)


# type/subtype with optional parameters, printable ASCII only (no header injection).
MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}(;[ -~]{0,120})?")


@router.get("/entries/{entry_id}/payload", responses={200: {"content": {"application/octet-stream": {}}}, **NOT_FOUND})
async def get_payload(entry_id: str, service: DeadLetters, tenant: Viewer) -> Response:
    """The original message body as it was received (read back from GridFS if it was large),
    always as `application/octet-stream`: the sender chose the stored content type, so it is never
    served as the answer's own (a `text/html` body would render in a browser); it is given in
    `X-Cairn-Original-Content-Type` when it is a plain media type."""
    data, content_type = await service.payload(tenant, entry_id)
    headers = {"X-Cairn-Original-Content-Type": content_type} if content_type and MEDIA_TYPE.fullmatch(content_type) else {}
    return Response(content=data, media_type="application/octet-stream", headers=headers)



@router.post("/entries/{entry_id}/replay", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted, responses=COMMAND_ERRORS)
async def replay_entry(
    entry_id: str, service: DeadLetters, tenant: Viewer, requested_by: Actor, body: Annotated[ReplayRequest | None, Body()] = None
) -> CommandAccepted:
    """Re-dispatch the entry's shard; it resumes from its checkpoint with a fresh attempt budget."""
    return await service.request(tenant, entry_id, "replay", requested_by.name, body.note if body else None, requested_by.api_key_id)


@router.post("/entries/{entry_id}/discard", status_code=status.HTTP_202_ACCEPTED, response_model=CommandAccepted, responses=COMMAND_ERRORS)
async def discard_entry(
    entry_id: str, service: DeadLetters, tenant: Viewer, requested_by: Actor, body: Annotated[DiscardRequest | None, Body()] = None
) -> CommandAccepted:
    """Close the entry without replay; it stays in task_errors as `discarded` for audit."""
    return await service.request(tenant, entry_id, "discard", requested_by.name, body.note if body else None, requested_by.api_key_id)


@router.get("/commands/{command_id}", response_model=CommandStatus, responses=NOT_FOUND)
async def get_command(command_id: str, service: DeadLetters, tenant: Viewer) -> CommandStatus:
    """What the DLQ handler did with a replay or discard command (pending until it has handled it)."""
    return await service.command(tenant, command_id)


@router.post(
    "/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BulkReplayAccepted,
    responses={422: {"description": "No filter given"}, 429: COMMAND_ERRORS[429], 503: COMMAND_ERRORS[503]},
)
async def replay_matching(body: BulkReplayRequest, service: DeadLetters, tenant: Viewer, requested_by: Actor) -> BulkReplayAccepted:
    """Replay the open, replayable entries matching the filter (all of a job: `{"job_id": ...}`)."""
    filters = ("job_id", "pipeline", "error_type", "reason", "shard_key", "since", "until")
    if all(getattr(body, name) is None for name in filters):
        raise Invalid(f"give at least one filter: {', '.join(filters)}", ("body",))
    return await service.replay_matching(tenant, body, requested_by.name, requested_by.api_key_id)
