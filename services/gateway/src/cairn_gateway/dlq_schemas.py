"""Bodies of the dead-letter API (`/dlq`)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cairn_contracts.bounds import ContractModel, Moment
from cairn_gateway.schemas import UtcDatetime


class DeadLetterSummary(BaseModel):
    id: str
    status: str = Field(description="open, replaying, replayed or discarded")
    reason: str = Field(description="non_retryable, retries_exhausted, poison, contract_violation, unknown_shard, or the broker's (rejected, expired...)")
    kind: str | None = Field(None, description="service (a DeadLetter envelope) or broker (dead-lettered by RabbitMQ)")
    error_type: str | None = None
    error_message: str | None = None
    job_id: str | None = None
    tenant: str | None = Field(None, description="The job's tenant (an operator's lists span tenants)")
    shard_key: str | None = None
    pipeline: str | None = None
    attempts: int = 0
    source_queue: str | None = None
    source_service: str | None = None
    created_at: UtcDatetime | None = None
    replayable: bool = Field(description="open, and names a shard to re-dispatch")
    replay: dict[str, Any] | None = Field(None, description="The replay in flight or the last one: who, when, outcome")
    superseded_by: str | None = Field(None, description="The entry holding the failure of a replay that failed again")
    raw_payload_id: str | None = Field(None, description="The original body is in GridFS: GET /dlq/entries/{id}/payload")
    pending_command: dict[str, Any] | None = Field(
        None, description="A replay or discard command published and not handled yet: command_id, action, at_ms"
    )


class DeadLetterEntry(DeadLetterSummary):
    """The whole task_errors document: stack, original message, death headers, replay history."""

    model_config = ConfigDict(extra="allow")

    stack: str | None = None
    original: dict[str, Any] | None = None
    death_headers: list[Any] | None = None
    replays: list[dict[str, Any]] = Field(default_factory=list)
    discard: dict[str, Any] | None = None


class DeadLetterPage(BaseModel):
    items: list[DeadLetterSummary]
    total: int = Field(description="Entries matching the filter")
    offset: int
    limit: int
    next_offset: int | None = Field(None, description="Offset of the next page; null on the last one")


class CommandAccepted(BaseModel):
    command_id: str
    action: Literal["replay", "discard"]
    dead_letter_id: str
    entry_url: str
    command_url: str = Field(description="GET it for the command's outcome once the DLQ handler has handled it")


class CommandStatus(BaseModel):
    """A replay or discard command and what became of it (`dlq_commands`)."""

    command_id: str
    action: Literal["replay", "discard"]
    dead_letter_id: str
    status: Literal["pending", "done", "not_published"] = Field(
        description="pending: published, not handled yet; done: handled (see outcome); not_published: the broker did not confirm it"
    )
    outcome: str | None = Field(
        None,
        description="dispatched (the replay runs: see replay_outcome), discarded, refused (detail says why), already_done",
    )
    detail: str | None = Field(None, description="Why it was refused (or not published)")
    requested_by: str | None = None
    requested_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = Field(None, description="When the DLQ handler handled it")
    entry_status: str | None = Field(None, description="The entry's status now")
    replay_outcome: str | None = Field(None, description="succeeded or failed_again once this command's replay has ended")
    entry_url: str


class DiscardRequest(ContractModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000, description="Why (kept in the entry for audit)")


class ReplayRequest(ContractModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000)


class BulkReplayRequest(ContractModel):
    """Replay the open, replayable entries matching every given filter (at least one), oldest first."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, max_length=200)
    pipeline: str | None = Field(None, max_length=200)
    error_type: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=200)
    shard_key: str | None = Field(None, max_length=300)
    since: Moment | None = Field(None, description="Recorded at or after")
    until: Moment | None = Field(None, description="Recorded before")
    limit: int = Field(100, ge=1, le=1000, description="At most this many commands per call")
    note: str | None = Field(None, max_length=2000)


class BulkReplayAccepted(BaseModel):
    matched: int = Field(description="Open, replayable entries matching the filter (and holding no command not handled yet)")
    published: int = Field(description="Replay commands confirmed by the broker")
    remaining: int = Field(description="Matching entries not sent in this call (call again)")
    held_by_quota: str | None = Field(
        None, description="Why some were not sent: replays that would reopen FAILED jobs past their tenant's max_running_jobs"
    )
    commands: list[CommandAccepted]
