"""Cairn's own MongoDB collections (its control data), by name.

No job may name one of them as its source or its target: a job that wrote records into `shards`
would break every roll-up, and one that read `api_keys` would copy other tenants' secrets.
`JobCollection` is the one check, the type of every collection a job names.
"""

from typing import Annotated, Any

from pydantic import AfterValidator, Field

JOBS = "jobs"
SHARDS = "shards"
CHECKPOINTS = "checkpoints"
# A job's ledger of counted shards, in buckets of consecutive shards: one document per bucket
# (cairn_runtime/tally.py), so counting a shard never rewrites an entry per shard of the job.
JOB_TALLIES = "job_tallies"
DEDUP = "task_dedup"  # the TaskDedup side-effect ledger (cairn_sdk.effects, the worker's effects.py)
TASK_ERRORS = "task_errors"
RAW_PAYLOADS = "raw_payloads"
SCHEDULES = "schedules"
# Replay/discard commands to the DLQ handler by command_id: the gateway records each one `pending`
# before publishing it, the DLQ handler records its outcome (GET /dlq/commands/{command_id}).
DLQ_COMMANDS = "dlq_commands"
# The pipeline catalog: one document per pipeline the workers announced (cairn_contracts.pipelines).
PIPELINES = "pipelines"
# Webhook outbox: one document per finished job that names a callback URL, with every delivery
# attempt (cairn_scheduler/webhooks.py).
WEBHOOK_DELIVERIES = "webhook_deliveries"
# Chains (`POST /v1/chains`): one document per chain naming its step jobs in order; its state is
# derived from theirs when read (the gateway's chains.py).
CHAINS = "chains"
API_KEYS = "api_keys"  # {_id: key id, tenant, scopes, secret_hash (sha256 hex), name, created_at, revoked_at}
TENANTS = "tenants"  # {_id: tenant, quotas, sources, updated_at_ms}: cairn_contracts.tenancy.TenantRecord
# GridFS bucket of large raw payloads (collections raw_payload_blobs.files / .chunks); the
# RawPayload metadata document in `raw_payloads` points at its file.
RAW_PAYLOAD_BUCKET = "raw_payload_blobs"

CONTROL_COLLECTIONS = frozenset(
    {JOBS, SHARDS, CHECKPOINTS, JOB_TALLIES, DEDUP, TASK_ERRORS, RAW_PAYLOADS, SCHEDULES, DLQ_COMMANDS, API_KEYS, PIPELINES}
    | {WEBHOOK_DELIVERIES, CHAINS, TENANTS}
)


def not_a_control_collection(name: str) -> str:
    """`name`, if a job may read or write it; ValueError (a 422 naming the field) if it is Cairn's own."""
    if is_control_collection(name):
        raise ValueError(f"{name!r} is one of Cairn's own collections: no job may read or write it")
    return name


def is_control_collection(name: str) -> bool:
    """Whether `name` is one of Cairn's control collections, a GridFS collection of its raw
    payloads (`raw_payload_blobs.files`/`.chunks`) or a MongoDB system collection."""
    return name in CONTROL_COLLECTIONS or name.startswith((f"{RAW_PAYLOAD_BUCKET}.", "system."))


# The same check as JSON Schema (what a pipeline's params schema says of a collection it reads, so
# the gateway refuses the job from the catalog alone): none of the names, none of the prefixes.
JOB_COLLECTION_SCHEMA: dict[str, Any] = {
    "not": {"anyOf": [{"enum": sorted(CONTROL_COLLECTIONS)}, {"pattern": f"^({RAW_PAYLOAD_BUCKET}|system)\\."}]}
}

# A collection a job names (its target, a mongo_range source): never one of Cairn's own.
JobCollection = Annotated[str, AfterValidator(not_a_control_collection), Field(json_schema_extra=JOB_COLLECTION_SCHEMA)]
