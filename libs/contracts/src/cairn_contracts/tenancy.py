"""Tenants: their storage namespaces, their quotas and the sources granted to them.

Namespace: every tenant's records and `mongo_range` sources live in a MongoDB database of its
own, `<cairn database>_t_<tenant>` (`tenant_database`), never in Cairn's database, which holds
only the control collections (jobs, shards, api_keys, ...). A job names collections only
(`target_collection`, `params.collection`); the database is the tenant's, derived from the key
that submitted it, so no job can name another tenant's namespace. A record's identity is
therefore (tenant database, collection, `_id`): two tenants ingesting the same keys store them
separately.

The `tenants` control collection holds one `TenantRecord` per tenant an operator configured
(`PUT /v1/tenants/{tenant}`): its quotas (None: the deployment's default from settings) and the
source collections of other databases it may read with `mongo_range` (`params.database`).
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError

from cairn_contracts.bounds import ContractModel
from cairn_contracts.jobs import JobSpec, LeaseFrontierSharding, lease_frontier_items
from cairn_contracts.namespaces import TENANTS, JobCollection
from cairn_contracts.pipelines import COUNTED_SPACES

__all__ = [
    "TENANTS",
    "MAX_CAIRN_DATABASE_NAME",
    "TENANT_NAME_PATTERN",
    "DatabaseName",
    "JobDemand",
    "SourceGrant",
    "TenantQuotas",
    "TenantRecord",
    "is_tenant_database",
    "job_demand",
    "tenant_database",
]

# MongoDB database names: at most 63 bytes; none of `/\\. "$*<>:|?`; compared case-insensitively
# by the server (two names differing only in case cannot both exist).
_MAX_DATABASE_NAME = 63
_HASHED_SUFFIX = len("_th_") + 24
# The longest Cairn database name whose tenant databases all fit (`<database>_th_<24 hex>`).
MAX_CAIRN_DATABASE_NAME = _MAX_DATABASE_NAME - _HASHED_SUFFIX
_PLAIN_TENANT = re.compile(r"^[a-z0-9_-]+$")

# A tenant's name, wherever one is made or named (API keys, `/v1/tenants/{tenant}`): ASCII only
# and not "." or ".." (HTTP clients resolve those path segments away), so every tenant an API key
# can belong to can also be configured over HTTP.
TENANT_NAME_PATTERN = r"^(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}|\.\.[A-Za-z0-9_.-]{1,62})$"

# A database a grant may name: letters, digits, '_' and '-' (what every server accepts).
DatabaseName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,63}$")]


def tenant_database(database: str, tenant: str) -> str:
    """The name of `tenant`'s namespace database beside Cairn's `database`.

    `<database>_t_<tenant>` for a lower-case tenant name of letters, digits, '_' and '-' that
    fits in 63 bytes; otherwise `<database>_th_<24 hex digits of sha256(tenant)>` (tenant names
    may hold '.' and capitals, which database names cannot hold or tell apart). The two forms
    never meet (`_t_` vs `_th_` right after the prefix), so the mapping is one-to-one."""
    plain = f"{database}_t_{tenant}"
    if _PLAIN_TENANT.fullmatch(tenant) and len(plain.encode()) <= _MAX_DATABASE_NAME:
        return plain
    if len(database.encode()) > MAX_CAIRN_DATABASE_NAME:  # the settings refuse such a name at start-up
        raise ValueError(f"database name {database!r} is longer than {MAX_CAIRN_DATABASE_NAME} bytes: its tenants' databases would not fit")
    return f"{database}_th_{hashlib.sha256(tenant.encode()).hexdigest()[:24]}"


def is_tenant_database(database: str, name: str) -> bool:
    """Whether `name` is some tenant's namespace database (or Cairn's own `database`)."""
    return name.lower() == database.lower() or name.lower().startswith((f"{database}_t_".lower(), f"{database}_th_".lower()))


class TenantQuotas(ContractModel):
    """A tenant's limits; a field left None takes the deployment's default (gateway and scheduler
    settings `CAIRN_TENANT_*`). 0 running jobs refuses every submission (a suspended tenant)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_running_jobs: int | None = Field(None, ge=0, le=1_000_000, description="Unfinished jobs at once (over: 429)")
    max_shards_per_job: int | None = Field(None, ge=1, le=10_000, description="Shards or work items one job plans (over: 422)")
    max_records_per_job: int | None = Field(
        None, ge=1, le=2**62, description="Key-space size of one job, where the pipeline's params give it (over: 422)"
    )
    max_in_flight_shards: int | None = Field(
        None, ge=1, le=100_000, description="Shard tasks the scheduler keeps queued or running for the tenant at once (a bundle of small shards is one task)"
    )

    def merged(self, defaults: "TenantQuotas") -> "TenantQuotas":
        """These quotas with every unset field taken from `defaults`."""
        own = self.model_dump(exclude_none=True)
        return TenantQuotas.model_validate({**defaults.model_dump(), **own})


class SourceGrant(ContractModel):
    """A collection outside the tenant's namespace that its `mongo_range` jobs may read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database: DatabaseName
    collection: JobCollection = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,120}$")


class TenantRecord(ContractModel):
    """A `tenants` document without its `_id` (the tenant's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quotas: TenantQuotas = Field(default_factory=TenantQuotas)
    sources: list[SourceGrant] = Field(default_factory=list, max_length=100)

    def grants(self, database: str, collection: str) -> bool:
        """Whether `database.collection` is granted to the tenant."""
        return any(g.database == database and g.collection == collection for g in self.sources)

    @classmethod
    def of(cls, document: dict[str, Any] | None) -> "TenantRecord":
        """The record stored in a `tenants` document (None or missing fields: defaults). Read
        tolerantly, as a document the gateway did not write may be there: fields the model does
        not know are ignored, quotas it cannot read are the defaults, and a grant it cannot read
        (not a database/collection pair, a control collection) grants nothing."""
        if not document:
            return cls()
        try:
            quotas = TenantQuotas.model_validate(document.get("quotas") or {})
        except ValidationError:
            quotas = TenantQuotas()
        sources = []
        for item in document.get("sources") or []:
            try:
                sources.append(SourceGrant.model_validate(item))
            except ValidationError:
                continue
        return cls(quotas=quotas, sources=sources[:100])


@dataclass(frozen=True)
class JobDemand:
    """What one job asks of its tenant's per-job quotas: `shards` it plans (range/hash-mod shards,
    or lease-frontier work items when `items`), `records` its key-space size (None: not known
    before it runs, a time window, or params still to come from a dependency)."""

    shards: int
    records: int | None
    items: bool = False

    def over(self, quotas: TenantQuotas) -> tuple[str, str] | None:
        """(the quota's name, why) for the first per-job quota this job is over, else None."""
        if quotas.max_shards_per_job is not None and self.shards > quotas.max_shards_per_job:
            return "max_shards_per_job", f"the job plans {self.shards} shards; this tenant's jobs plan at most {quotas.max_shards_per_job}"
        if quotas.max_records_per_job is not None and self.records is not None and self.records > quotas.max_records_per_job:
            return (
                "max_records_per_job",
                f"the job's key space holds {self.records} records; this tenant's jobs hold at most {quotas.max_records_per_job}",
            )
        return None


def job_demand(spec: JobSpec, space: dict[str, Any] | None) -> JobDemand:
    """A job's `JobDemand` from its spec and its resolved work space (`{kind, start, end}`, the
    pipeline catalog's). `space` None (a job whose params come from its dependency,
    `params_from`, before its release): its range/hash-mod shards only."""
    lease_frontier = isinstance(spec.sharding, LeaseFrontierSharding)
    if space is None:
        return JobDemand(0 if lease_frontier else spec.sharding.shards, None, lease_frontier)
    start, end = int(space["start"]), int(space["end"])
    records = end - start if space.get("kind", "key_range") in COUNTED_SPACES else None
    if isinstance(spec.sharding, LeaseFrontierSharding):
        return JobDemand(lease_frontier_items((start, end), spec.sharding.item_size), records, items=True)
    return JobDemand(spec.sharding.shards, records)
