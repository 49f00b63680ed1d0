"""MongoDB collection names and their indexes: the shared store's layout.

Every service creates the indexes it relies on at start-up (creating an existing index is a
no-op), so a fresh database is usable by whichever service starts first.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cairn_contracts.clock import to_ms, utcnow
from cairn_contracts.jobs import JOB_SPEC_ADAPTER

# Re-exported (callers import the names from here); defined in namespaces.py with the check that
# keeps jobs out of them.
from cairn_contracts.namespaces import (  # noqa: F401
    API_KEYS,
    CHAINS,
    CHECKPOINTS,
    DEDUP,
    DLQ_COMMANDS,
    JOB_TALLIES,
    JOBS,
    RAW_PAYLOAD_BUCKET,
    RAW_PAYLOADS,
    SCHEDULES,
    SHARDS,
    TASK_ERRORS,
    TENANTS,
    WEBHOOK_DELIVERIES,
)
from cairn_contracts.states import JobState, ShardState

# Redis key of a finished job's cached status (the gateway fills it; whoever reopens a finished
# job, the DLQ handler on replay, deletes it).
STATUS_CACHE_KEY = "{prefix}:status:{tenant}:{job_id}"

# Redis lock of a job fingerprint (value: the job id holding it): an identical job of the same
# tenant is refused while it is held by an unfinished job. The gateway takes it on create, the
# scheduler releases it (only if it still holds that job id) when the job is terminal.
JOB_LOCK_KEY = "{prefix}:joblock:{tenant}:{fingerprint}"

# The filter part "its job is not cancelled" of a write to a shard or checkpoint. Neither record
# has the field until a cancel or terminate sets it true (cairn_scheduler.stopping; never false,
# never unset), and an equality on null matches a missing field on MongoDB, as on the stand-in,
# where it costs an update half as much as `$in: [false, null]` does ($ne: true would not match
# a missing field in the stand-in's updates). A writer that stored `false` would make every
# claim of the shard miss: ShardRecord and CheckpointRecord must never carry the field.
NOT_CANCELLED: dict[str, None] = {"cancel_requested": None}

# A QUEUED or RUNNING shard's task as fair dispatch counts it (cairn_scheduler.fairness): the
# first shard key of the bundle it was sent in (its own key when sent alone), written by the pass
# that sends it and again by a worker's bulk claim of a bundle or frontier block (which may come
# before the pass marks them). A shard re-sent on its own (a retry, a reclaim, a lost task, a
# replay) or claimed on its own by a worker has it set to null: it counts as a task of its own.
QUEUED_TASK = "queued_task"

DEFAULT_TENANT = "default"
MAIN_SUB_KEY = "main"  # sub-key of a shard's only cursor; multi-cursor shards use others


@dataclass(frozen=True)
class IndexSpec:
    collection: str
    keys: tuple[tuple[str, int], ...]
    unique: bool = False
    sparse: bool = False
    # Index only the documents that match (MongoDB's partialFilterExpression). A *sparse* compound
    # index still indexes a document that has any one of its keys, so it cannot make an optional
    # field unique per tenant: every job without the field would collide on (tenant, null).
    partial_filter: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def name(self) -> str:
        return "_".join(f"{field}_{direction}" for field, direction in self.keys)


INDEXES: tuple[IndexSpec, ...] = (
    IndexSpec(
        JOBS,
        (("tenant", 1), ("idempotency_key", 1)),
        unique=True,
        partial_filter={"idempotency_key": {"$type": "string"}},
    ),
    IndexSpec(JOBS, (("tenant", 1), ("created_at", 1))),
    IndexSpec(JOBS, (("state", 1), ("command_published_at", 1))),
    IndexSpec(JOBS, (("tenant", 1), ("created_at_ms", 1))),
    IndexSpec(JOBS, (("tenant", 1), ("state", 1))),
    IndexSpec(JOBS, (("cancel_requested", 1), ("state", 1))),
    IndexSpec(JOBS, (("finished_at_ms", 1),)),
    IndexSpec(SHARDS, (("shard_key", 1),), unique=True),
    IndexSpec(SHARDS, (("job_id", 1), ("state", 1))),
    # A job's shards by job id alone (the reconcile pass, bulk dispatch, frontier tail): MongoDB
    # would use the compound index's prefix, the stand-in uses no compound index at all.
    IndexSpec(SHARDS, (("job_id", 1),)),
    IndexSpec(SHARDS, (("lease_until", 1),)),
    # The scheduler's due retries and lost-task scan (reaper.py).
    IndexSpec(SHARDS, (("state", 1), ("next_retry_at_ms", 1))),
    IndexSpec(SHARDS, (("state", 1), ("queued_at_ms", 1))),
    IndexSpec(CHECKPOINTS, (("shard_key", 1), ("sub_key", 1)), unique=True),
    IndexSpec(CHECKPOINTS, (("job_id", 1),)),
    IndexSpec(JOB_TALLIES, (("job_id", 1),)),
    IndexSpec(DEDUP, (("task_fingerprint", 1),), unique=True),
    IndexSpec(TASK_ERRORS, (("job_id", 1), ("created_at", 1))),
    IndexSpec(TASK_ERRORS, (("status", 1), ("created_at", 1))),
    IndexSpec(TASK_ERRORS, (("shard_key", 1), ("status", 1))),
    IndexSpec(TASK_ERRORS, (("created_at", 1),)),
    IndexSpec(RAW_PAYLOADS, (("task_error_id", 1),)),
    IndexSpec(SCHEDULES, (("next_run_at", 1),)),
    IndexSpec(SCHEDULES, (("paused", 1), ("next_run_at_ms", 1))),
    IndexSpec(SCHEDULES, (("tenant", 1), ("created_at_ms", 1))),
    IndexSpec(API_KEYS, (("tenant", 1),)),
    # Workflows: the jobs waiting for a job (`after` holds it; a multikey index), and a tenant's chains.
    IndexSpec(JOBS, (("after", 1),), partial_filter={"state": "WAITING"}),
    IndexSpec(CHAINS, (("tenant", 1), ("created_at_ms", 1))),
    # The webhook outbox fill (finished jobs with a callback not queued yet) and the delivery loop.
    IndexSpec(JOBS, (("webhook_queued", 1), ("state", 1)), partial_filter={"spec.callback_url": {"$type": "string"}}),
    IndexSpec(WEBHOOK_DELIVERIES, (("state", 1), ("next_attempt_at_ms", 1))),
    IndexSpec(WEBHOOK_DELIVERIES, (("tenant", 1), ("created_at_ms", 1))),
)


# --- the jobs document -------------------------------------------------------------------------
# Both the gateway (API submissions) and the scheduler (schedule runs) create job documents, so
# their shape is defined once here.


def spec_fingerprint(spec: Any) -> str:
    """sha256 of the spec's canonical JSON: equal specs, equal fingerprints (idempotency, job lock)."""
    canonical = json.dumps(JOB_SPEC_ADAPTER.dump_python(spec, mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_id_for(tenant: str, idempotency_key: str) -> str:
    """The id of the job a tenant submits under an idempotency key: the same for every request
    that carries the key, so concurrent identical requests race for one document and one lock."""
    return hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).hexdigest()[:32]


class JobRecord(BaseModel):
    """A `jobs` document as it is inserted (state PENDING, command not yet published).

    Timestamps that queries compare or sort on are also kept as integer epoch milliseconds
    (`created_at_ms`; the scheduler adds `finished_at_ms`): see docs/mongodb-stand-in.md.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    name: str | None
    pipeline: str
    priority: int
    spec: dict[str, Any]
    spec_fingerprint: str
    state: JobState = JobState.PENDING
    created_at: datetime
    created_at_ms: int
    command_published_at: datetime | None = None
    idempotency_key: str | None = Field(None, max_length=200)
    schedule_id: str | None = Field(None, description="The schedule that fired this job")
    schedule_run: int | None = Field(None, description="Its run number (manual runs: none)")
    # From the pipeline catalog at submission (cairn_contracts.pipelines.check_job): the scheduler
    # plans from `space` ({kind, <fields>, start, end}) without the pipeline's code.
    pipeline_version: str | None = None
    space: dict[str, Any] | None = None
    # Workflows: the ids the job waits for (its spec's `after`, kept at the top level for the
    # scheduler's dependents query), and the chain it is a step of.
    after: list[str] | None = None
    chain_id: str | None = None
    chain_step: int | None = None

    @classmethod
    def new(
        cls,
        spec: Any,
        tenant: str,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        schedule_id: str | None = None,
        schedule_run: int | None = None,
        now: datetime | None = None,
        pipeline_version: str | None = None,
        space: dict[str, Any] | None = None,
        chain_id: str | None = None,
        chain_step: int | None = None,
    ) -> "JobRecord":
        """A job to insert: WAITING when its spec names dependencies (`after`), else PENDING."""
        spec = JOB_SPEC_ADAPTER.validate_python(spec)
        moment = now or utcnow()
        if job_id is None:
            job_id = job_id_for(tenant, idempotency_key) if idempotency_key is not None else uuid.uuid4().hex
        return cls(
            id=job_id,
            tenant=tenant,
            name=spec.name,
            pipeline=spec.pipeline,
            priority=int(spec.priority),
            spec=spec.model_dump(mode="json"),
            spec_fingerprint=spec_fingerprint(spec),
            created_at=moment,
            created_at_ms=to_ms(moment),
            idempotency_key=idempotency_key,
            schedule_id=schedule_id,
            schedule_run=schedule_run,
            pipeline_version=pipeline_version,
            space=space,
            state=JobState.WAITING if spec.after else JobState.PENDING,
            after=list(spec.after) or None,
            chain_id=chain_id,
            chain_step=chain_step,
        )

    def job_spec(self) -> Any:
        return JOB_SPEC_ADAPTER.validate_python(self.spec)

    def to_document(self) -> dict[str, Any]:
        document = self.model_dump(exclude={"id"})
        document["_id"] = self.id
        document["state"] = str(self.state)
        for optional in ("idempotency_key", "schedule_id", "schedule_run", "pipeline_version", "space", "after", "chain_id", "chain_step"):
            if document[optional] is None:
                del document[optional]  # the unique (tenant, idempotency_key) index covers strings only
        return document


# --- the shards and checkpoints documents ------------------------------------------------------
# The scheduler records them when it plans a job; the worker claims and advances them, the gateway
# reads them for progress. Tests seed them through these models, so there is one layout.
#
# One shard or checkpoint is read and written by `_id` (a shard's `_id` is its `shard_key`, a
# checkpoint's is `checkpoint_id(shard_key)`), never by `shard_key`: the primary key is the one
# index every server uses for every command. On MongoDB the unique `shard_key` index would serve
# as well; the stand-in uses a secondary index for `find` only, so an update, findAndModify or
# count filtered on `shard_key` scans every shard of every job (docs/mongodb-stand-in.md).


def shard_key_for(job_id: str, index: int) -> str:
    """The key of a job's shard (or lease-frontier item) `index`: `{job_id}:{index:04d}`; the
    shard document's `_id`."""
    return f"{job_id}:{index:04d}"


# A job deleted and submitted again with the same Idempotency-Key gets the same id, so the same
# shard keys and checkpoint ids: this stamp tells the documents of one submission from the next.
_JOB_CREATED_AT_MS = "Its job's created_at_ms: tells this submission's documents from those of an earlier job of the same id"


def checkpoint_id(shard_key: str, sub_key: str = MAIN_SUB_KEY) -> str:
    """The `_id` of a shard's checkpoint for one cursor (`sub_key`): `{shard_key}/{sub_key}`."""
    return f"{shard_key}/{sub_key}"


class CheckpointRecord(BaseModel):
    """A `checkpoints` document as planning inserts it: one cursor (`sub_key`) of a shard, at the
    start of its range. `_id` is `{shard_key}/{sub_key}` (unique with the (shard_key, sub_key)
    index). The worker moves `cursor` and the counters forward, each write fenced by
    `fencing_token` (the shard's token of the claim that wrote it). Keys are integers up to
    INT64_MAX; `updated_at` a datetime."""

    model_config = ConfigDict(frozen=True)

    shard_key: str
    sub_key: str = MAIN_SUB_KEY
    job_id: str
    # The pipeline's own cursor (any JSON value, opaque to Cairn): None until the first batch is
    # stored (the runner then asks the pipeline's `start`); `position` is progress in space units.
    cursor: Any = Field(None, description="Where the next read starts, as the pipeline wrote it (JSON)")
    position: int | None = Field(None, description="Progress inside [range_start, range_end); range_start at planning")
    range_start: int
    range_end: int = Field(description="Exclusive")
    records_estimate: int
    records_done: int = 0
    records_written: int = 0
    records_redone: int = 0
    # The sink's outcome per write mode (cairn_contracts.sinks.WRITE_COUNTERS); records_written is
    # inserted + updated, records_redone the same figure as records_duplicate.
    records_inserted: int = 0
    records_updated: int = 0
    records_unchanged: int = 0
    records_duplicate: int = 0
    batches: int = 0
    fencing_token: int = 0
    job_created_at_ms: int | None = Field(None, description=_JOB_CREATED_AT_MS)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def id(self) -> str:
        return checkpoint_id(self.shard_key, self.sub_key)

    def to_document(self) -> dict[str, Any]:
        return {"_id": self.id, **self.model_dump()}


class ShardBucket(BaseModel):
    """A hash-mod shard's slice of its range: the keys whose hash % modulus == remainder."""

    model_config = ConfigDict(frozen=True)

    modulus: int
    remainder: int


class ShardRecord(BaseModel):
    """A `shards` document as planning inserts it (state PLANNED, never claimed). `_id` is its
    `shard_key` (`{job_id}:{index:04d}`). Later writes add fields (`queued_at_ms`,
    `next_retry_at_ms`, `retry`, `retries`, `last_error`, `finished_at`...): see docs/design.md.
    `lease_until` is epoch ms (cairn_contracts.clock), `created_at` a datetime."""

    model_config = ConfigDict(frozen=True)

    shard_key: str
    job_id: str
    index: int
    strategy: str = Field(description="The job's sharding strategy (range, hash_mod, lease_frontier)")
    range_start: int
    range_end: int = Field(description="Exclusive")
    bucket: ShardBucket | None = None
    records_estimate: int
    priority: int
    state: ShardState = ShardState.PLANNED
    attempts: int = 0
    fencing_token: int = 0
    lease_until: int | None = None
    taken_by: str | None = None
    job_created_at_ms: int | None = Field(None, description=_JOB_CREATED_AT_MS)
    created_at: datetime = Field(default_factory=utcnow)

    def checkpoint(self, *, updated_at: datetime | None = None) -> CheckpointRecord:
        """The shard's main checkpoint as planning records it (no cursor yet, position range_start)."""
        return CheckpointRecord(
            shard_key=self.shard_key,
            job_id=self.job_id,
            position=self.range_start,
            range_start=self.range_start,
            range_end=self.range_end,
            records_estimate=self.records_estimate,
            job_created_at_ms=self.job_created_at_ms,
            updated_at=updated_at or self.created_at,
        )

    def to_document(self) -> dict[str, Any]:
        document = {"_id": self.shard_key, **self.model_dump()}
        document["state"] = str(self.state)
        return document
