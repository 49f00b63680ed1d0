"""The HTTP API's response bodies (request bodies are the contracts' JobSpec)."""

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from cairn_contracts.sinks import WRITE_COUNTERS
from cairn_contracts.states import JobState
from cairn_runtime import tally


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
    cancelled: int = 0


class ShardRetryInfo(BaseModel):
    """A shard waiting for its retry: which attempt failed, of how many, and when the next one starts."""

    shard_key: str
    attempt: int = Field(description="Attempts made so far (since the shard was planned or last replayed)")
    max_attempts: int | None = None
    next_retry_at: UtcDatetime | None = None
    delay_s: float | None = None
    last_error: str | None = None


class FailedShardInfo(BaseModel):
    """A dead-lettered shard and the task_errors entry that tells why (GET /dlq/entries/{id})."""

    shard_key: str
    task_error_id: str | None
    attempts: int
    error: str | None = None
    entry_url: str | None = None


class Writes(BaseModel):
    """What the job's sink did with its records so far (README "Write modes"): summed over its
    shards' committed batches, each record counted once."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicate: int = 0
    deleted: int | None = Field(None, description="replace_window: stale records deleted at the job's success")

    @classmethod
    def of(cls, checkpoints: Iterable[dict[str, Any]], job: dict[str, Any]) -> "Writes":
        """Summed over the job's checkpoints; `deleted` from the job's `records_deleted` (added
        by the scheduler's stale delete), None if it never ran one."""
        totals = dict.fromkeys(WRITE_COUNTERS, 0)
        for checkpoint in checkpoints:
            for counter in WRITE_COUNTERS:
                totals[counter] += int(checkpoint.get(counter) or 0)
        deleted = job.get("records_deleted", (job.get("result") or {}).get("records_deleted"))
        return cls(**{name.removeprefix("records_"): value for name, value in totals.items()}, deleted=deleted)

    @classmethod
    def of_job(cls, job: dict[str, Any]) -> "Writes":
        """From the job document alone (O(1) in its shards): per counter the largest of the
        ended shards' exact totals (`counts`, cairn_runtime.tally), the scheduler's last
        snapshot of every checkpoint (`progress.writes`) and the finished job's result."""
        counts = tally.counts_of(job)
        snapshot = tally.as_dict(tally.as_dict(job.get("progress")).get("writes"))
        result = tally.as_dict(job.get("result"))
        totals = {
            counter: max(int(counts.get(counter) or 0), int(snapshot.get(counter) or 0), int(result.get(counter) or 0))
            for counter in WRITE_COUNTERS
        }
        deleted = job.get("records_deleted", result.get("records_deleted"))
        return cls(**{name.removeprefix("records_"): value for name, value in totals.items()}, deleted=deleted)


class TaskStatus(BaseModel):
    task_id: str
    state: JobState
    progress: float = Field(description="Percent of the job's key range covered by stored batches")
    records_done: int
    writes: Writes = Field(default_factory=Writes, description="The sink's counters: inserted, updated, unchanged, duplicate")
    records_total: int | None
    shards: ShardCounts
    pipeline: str
    name: str | None
    priority: int
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    retrying: list[ShardRetryInfo] = Field(default_factory=list, description="Shards waiting for a retry (first 50)")
    failed_shards: list[FailedShardInfo] = Field(
        default_factory=list, description="Dead-lettered shards with their task_errors ids (first 50)"
    )
    dead_letters_url: str | None = Field(None, description="The job's entries in the dead-letter queue")


class TaskResult(BaseModel):
    task_id: str
    state: JobState
    result: dict[str, Any]
    finished_at: UtcDatetime | None
