"""MongoDB collection names and their indexes: the shared store's layout.

Every service creates the indexes it relies on at start-up (creating an existing index is a
no-op), so a fresh database is usable by whichever service starts first.
"""

from dataclasses import dataclass, field
from typing import Any

JOBS = "jobs"
SHARDS = "shards"
CHECKPOINTS = "checkpoints"
DEDUP = "dedup"
TASK_ERRORS = "task_errors"
RAW_PAYLOADS = "raw_payloads"
SCHEDULES = "schedules"
# GridFS bucket of large raw payloads (collections raw_payload_blobs.files / .chunks); the
# RawPayload metadata document in `raw_payloads` points at its file.
RAW_PAYLOAD_BUCKET = "raw_payload_blobs"
# Test and benchmark scaffolding: the synthetic pipeline's `fail_while_flag` fails while a
# document {_id: <flag>} exists here ("the source is broken" until someone deletes it).
FAULT_FLAGS = "fault_flags"

# Redis key of a finished job's cached status (the gateway fills it; whoever reopens a finished
# job, the DLQ handler on replay, deletes it).
STATUS_CACHE_KEY = "{prefix}:status:{tenant}:{job_id}"

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
    IndexSpec(SHARDS, (("task_key", 1),), unique=True),
    IndexSpec(SHARDS, (("job_id", 1), ("state", 1))),
    IndexSpec(SHARDS, (("lease_until", 1),)),
    IndexSpec(CHECKPOINTS, (("shard_key", 1), ("sub_key", 1)), unique=True),
    IndexSpec(CHECKPOINTS, (("job_id", 1),)),
    IndexSpec(DEDUP, (("task_fingerprint", 1),), unique=True),
    IndexSpec(TASK_ERRORS, (("job_id", 1), ("created_at", 1))),
    IndexSpec(TASK_ERRORS, (("status", 1), ("created_at", 1))),
    IndexSpec(TASK_ERRORS, (("shard_key", 1), ("status", 1))),
    IndexSpec(TASK_ERRORS, (("created_at", 1),)),
    IndexSpec(RAW_PAYLOADS, (("task_error_id", 1),)),
    IndexSpec(SCHEDULES, (("next_run_at", 1),)),
)
