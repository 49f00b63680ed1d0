"""Bodies of the versioned task API (`/v1/jobs`, `/v1/schedules`, `/v1/keys`)."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from cairn_contracts.bounds import ContractModel, Moment
from cairn_contracts.jobs import MAX_CHAIN_STEPS, JobSpec
from cairn_contracts.schedules import MAX_INTERVAL_S, OverlapPolicy, ScheduleKind
from cairn_contracts.states import JobState
from cairn_contracts.tenancy import SourceGrant, TenantQuotas
from cairn_gateway.schemas import UtcDatetime, Writes


# --- jobs ----------------------------------------------------------------------------------------
class JobAccepted(BaseModel):
    id: str
    state: JobState
    created: bool = Field(description="False when the Idempotency-Key matched an existing job")
    url: str = Field(description="GET it for the job and its shards")


class JobSummary(BaseModel):
    id: str
    tenant: str | None = Field(None, description="The job's tenant (an operator's lists span tenants)")
    name: str | None = None
    pipeline: str
    priority: int = Field(description="1 LOW, 2 NORMAL, 3 HIGH, 4 CRITICAL")
    state: JobState = Field(description="CANCELLING while a requested cancel waits for running shards to stop")
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    shard_count: int | None = None
    records_total: int | None = None
    idempotency_key: str | None = None
    schedule_id: str | None = Field(None, description="The schedule that fired the job")
    cancel_requested: bool = False
    after: list[str] = Field(default_factory=list, description="The jobs it waits for (WAITING until they all succeeded)")
    chain_id: str | None = Field(None, description="The chain it is a step of (GET /v1/chains/{id})")
    chain_step: int | None = Field(None, description="Its index in that chain (0-based)")
    released_at: UtcDatetime | None = Field(None, description="When its dependencies released it (WAITING -> PENDING)")
    dependency_failure: dict[str, Any] | None = Field(
        None, description="Why it never ran: {at: 'after[i]', job_id, state, reason} of the dependency that did not succeed, or of params it could not fill"
    )
    url: str


class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last one")
    limit: int


class ShardView(BaseModel):
    shard_key: str
    index: int | None = None
    state: str
    attempts: int = 0
    range_start: int | None = None
    range_end: int | None = None
    cursor: int | None = Field(None, description="Next key to process (the checkpoint)")
    records_done: int = 0
    records_written: int = 0
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    last_error: str | None = None


class JobDetail(JobSummary):
    spec: dict[str, Any]
    progress: float = Field(description="Percent of the key range covered by stored batches")
    records_done: int
    writes: Writes = Field(default_factory=Writes, description="The sink's counters: inserted, updated, unchanged, duplicate")
    shards: list[ShardView] = Field(description="One page of the job's shards in index order (at most `shard_limit`)")
    shards_truncated: bool = Field(False, description="More shards follow this page")
    shards_next_cursor: str | None = Field(None, description="Pass as `shards_after` for the next page (None: last page)")


class JobCounts(BaseModel):
    counts: dict[str, int] = Field(description="Jobs of the tenant by state (every state listed, CANCELLING included)")
    total: int


class JobResultBody(BaseModel):
    id: str
    state: JobState
    result: dict[str, Any]
    finished_at: UtcDatetime | None = None
    expires_at: UtcDatetime | None = Field(None, description="After this the result is gone (410); CAIRN_RESULT_TTL_S")


# --- chains --------------------------------------------------------------------------------------
class ChainSpec(ContractModel):
    """A chain: jobs run one after another. Step i+1 waits for step i (its `after` starts with it)
    and may read step i's result into its params with `params_from`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, max_length=200)
    steps: list[JobSpec] = Field(..., min_length=1, max_length=MAX_CHAIN_STEPS, description="The jobs, in order")


class ChainStep(BaseModel):
    index: int
    job: JobSummary
    progress: float | None = Field(None, description="Percent of the step's work done")


class ChainView(BaseModel):
    id: str
    name: str | None = None
    state: JobState = Field(
        description="SUCCESS once every step succeeded; FAILURE/CANCELLED as the first step that did not; else the state of the step that runs (WAITING, PENDING, STARTED, RETRY)"
    )
    current_step: int | None = Field(None, description="The first step that has not succeeded (None once all did)")
    steps: list[ChainStep]
    created_at: UtcDatetime
    url: str
    detail: str | None = Field(None, description="Why the chain failed when no step of it could say (none was recorded)")


class ChainAccepted(BaseModel):
    id: str
    created: bool = Field(description="False when the Idempotency-Key matched an existing chain")
    job_ids: list[str] = Field(description="The steps' job ids, in order")
    url: str


class ChainPage(BaseModel):
    items: list[ChainView]
    next_cursor: str | None = None
    limit: int


# --- schedules -----------------------------------------------------------------------------------
class ScheduleView(BaseModel):
    id: str
    name: str | None = None
    description: str | None = None
    overlap: OverlapPolicy = Field("skip", description="What a run due while the previous one is active does")
    kind: ScheduleKind
    cron: str | None = None
    timezone: str = "UTC"
    interval_s: int | None = None
    at: UtcDatetime | None = None
    start_at: UtcDatetime | None = None
    end_at: UtcDatetime | None = None
    max_runs: int | None = None
    job: dict[str, Any] = Field(description="The job spec each run submits")
    paused: bool
    state: str = Field(description="active, paused or finished (no run left)")
    next_run_at: UtcDatetime | None = None
    last_run_at: UtcDatetime | None = None
    last_job_id: str | None = None
    total_runs: int = Field(description="Scheduled runs fired or buffered (manual triggers not counted)")
    manual_runs: int = 0
    skipped_runs: int = Field(0, description="Runs dropped by the overlap policy (the previous run was still active)")
    buffered_run: bool = Field(False, description="A run waits for the previous one to end (buffer_one, cancel_other)")
    created_at: UtcDatetime
    updated_at: UtcDatetime | None = None
    url: str


class SchedulePage(BaseModel):
    items: list[ScheduleView]
    next_cursor: str | None = None
    limit: int


class ScheduleUpdate(ContractModel):
    """Fields to change; the timing is validated as a whole after the change. Any timing change
    recomputes the next run from now."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    description: str | None = Field(None, max_length=2000)
    overlap: OverlapPolicy | None = None
    kind: ScheduleKind | None = None
    cron: str | None = Field(None, max_length=200)
    timezone: str | None = Field(None, max_length=64)
    interval_s: int | None = Field(None, ge=1, le=MAX_INTERVAL_S)
    at: Moment | None = None
    start_at: Moment | None = None
    end_at: Moment | None = None
    max_runs: int | None = Field(None, ge=1, le=1_000_000)
    job: JobSpec | None = None


class NextRuns(BaseModel):
    schedule_id: str
    state: str = Field(description="active, paused (no run until resumed: none listed) or finished")
    runs: list[UtcDatetime] = Field(description="The next scheduled run times, soonest first (fewer when the schedule ends)")


class BatchDelete(ContractModel):
    """Ids to delete in one request (each is deleted on its own: some may be gone already)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1, max_length=200)


class BatchDeleted(BaseModel):
    deleted: list[str] = Field(description="Ids deleted by this request")
    not_found: list[str] = Field(description="Ids of nothing of this tenant's (or gone already)")
    refused: dict[str, str] = Field(default_factory=dict, description="Id -> why it was kept (e.g. the job is not finished)")


class TriggerAccepted(BaseModel):
    job_id: str
    schedule_id: str
    created: bool
    url: str


# --- keys ----------------------------------------------------------------------------------------
class KeyCreate(ContractModel):
    model_config = ConfigDict(extra="forbid")

    scopes: list[str] = Field(..., min_length=1, max_length=4, description="submit, read, admin, operator (only an operator key may grant it)")
    name: str | None = Field(None, max_length=200)
    rate_limit_per_minute: int | None = Field(None, ge=0, le=1_000_000)


class KeyView(BaseModel):
    id: str
    tenant: str
    scopes: list[str]
    name: str | None = None
    rate_limit_per_minute: int | None = None
    created_at: UtcDatetime | None = None
    revoked: bool


class KeyCreated(KeyView):
    token: str = Field(description="Shown once: only its hash is stored")


class TenantView(BaseModel):
    tenant: str
    namespace: str = Field(description="The MongoDB database holding the tenant's records, own mongo_range sources and raw pages")
    quotas: TenantQuotas = Field(description="The tenant's own quotas (unset: the deployment's default)")
    effective_quotas: TenantQuotas = Field(
        description="The quotas in force (own, else the gateway's default; max_in_flight_shards null: the scheduler's CAIRN_TENANT_MAX_IN_FLIGHT_SHARDS)"
    )
    sources: list[SourceGrant] = Field(description="Collections of other databases its mongo_range jobs may read")
