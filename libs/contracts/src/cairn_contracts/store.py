"""MongoDB collection names and their indexes: the shared store's layout.

Every service creates the indexes it relies on at start-up (creating an existing index is a
no-op), so a fresh database is usable by whichever service starts first.
"""

from dataclasses import dataclass

JOBS = "jobs"
SHARDS = "shards"
CHECKPOINTS = "checkpoints"
DEDUP = "dedup"
TASK_ERRORS = "task_errors"
RAW_PAYLOADS = "raw_payloads"
SCHEDULES = "schedules"

DEFAULT_TENANT = "default"
MAIN_SUB_KEY = "main"  # sub-key of a shard's only cursor; multi-cursor shards use others


@dataclass(frozen=True)
class IndexSpec:
    collection: str
    keys: tuple[tuple[str, int], ...]
    unique: bool = False
    sparse: bool = False

    @property
    def name(self) -> str:
        return "_".join(f"{field}_{direction}" for field, direction in self.keys)


INDEXES: tuple[IndexSpec, ...] = (
    IndexSpec(JOBS, (("tenant", 1), ("idempotency_key", 1)), unique=True, sparse=True),
    IndexSpec(JOBS, (("tenant", 1), ("created_at", 1))),
    IndexSpec(JOBS, (("state", 1), ("command_published_at", 1))),
    IndexSpec(SHARDS, (("task_key", 1),), unique=True),
    IndexSpec(SHARDS, (("job_id", 1), ("state", 1))),
    IndexSpec(SHARDS, (("lease_until", 1),)),
    IndexSpec(CHECKPOINTS, (("shard_key", 1), ("sub_key", 1)), unique=True),
    IndexSpec(CHECKPOINTS, (("job_id", 1),)),
    IndexSpec(DEDUP, (("task_fingerprint", 1),), unique=True),
    IndexSpec(TASK_ERRORS, (("job_id", 1), ("created_at", 1))),
    IndexSpec(SCHEDULES, (("next_run_at", 1),)),
)
