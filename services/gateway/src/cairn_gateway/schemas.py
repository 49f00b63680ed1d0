"""The HTTP API's response bodies (request bodies are the contracts' JobSpec)."""

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from cairn_contracts.states import JobState


def _as_utc(moment: datetime) -> datetime:
    """Stored timestamps are UTC; some servers hand them back without a zone."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class TaskAccepted(BaseModel):
    task_id: str
    state: JobState
    status_url: str
    created: bool = Field(description="False when an Idempotency-Key matched an existing job")


class ShardCounts(BaseModel):
    total: int = 0
    planned: int = 0
    queued: int = 0
    running: int = 0
    retry: int = 0
    succeeded: int = 0
    failed: int = 0


class TaskStatus(BaseModel):
    task_id: str
    state: JobState
    progress: float = Field(description="Percent of the job's key range covered by stored batches")
    records_done: int
    records_total: int | None
    shards: ShardCounts
    pipeline: str
    name: str | None
    priority: int
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None


class TaskResult(BaseModel):
    task_id: str
    state: JobState
    result: dict[str, Any]
    finished_at: UtcDatetime | None


class ErrorBody(BaseModel):
    detail: str
