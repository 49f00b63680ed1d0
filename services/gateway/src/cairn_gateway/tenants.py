"""Tenants: their quotas, the sources granted to them, and where a job of theirs reads.

One `tenants` document per configured tenant (`cairn_contracts.tenancy.TenantRecord`), written
by an operator (`PUT /v1/tenants/{tenant}`); a tenant without one has the deployment's defaults
(`CAIRN_TENANT_MAX_*` gateway settings). Quotas are checked at submission (`check_submit`):

- `max_running_jobs`: the tenant's unfinished jobs (WAITING, PENDING, STARTED, RETRY) at once; a
  chain counts as its steps; over it, 429 `QuotaExceeded` naming the quota. Counted before the insert, so concurrent submissions of
  one tenant can pass it by at most their number (the count is not a lock; the price of no
  per-tenant counter to keep right through crashes).
- `max_shards_per_job`: shards or lease-frontier work items the job plans; over it, 422 on
  `["body", "sharding", "shards"]` (`item_size` for the lease frontier).
- `max_records_per_job`: the size of the job's key space (`end - start`, `count`) where the
  pipeline's params give one; over it, 422 on `["body", "params"]`.
"""

import logging
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.states import ACTIVE_JOB_STATES, state_values
from cairn_contracts.store import JOBS
from cairn_contracts.tenancy import TENANTS, JobDemand, TenantQuotas, TenantRecord, is_tenant_database, tenant_database
from cairn_gateway.errors import Invalid, NotFound, RateLimited

logger = logging.getLogger(__name__)

# A client over its running-jobs quota may try again once one of its jobs ends; no time is known.
QUOTA_RETRY_AFTER_S = 10


class QuotaExceeded(RateLimited):
    """A tenant's running-jobs quota is reached (429; the detail names the quota)."""

    at = ("body",)  # the job submitted, not the key: other keys of the tenant are refused alike

    def __init__(self, quota: str, detail: str) -> None:
        super().__init__(f"quota {quota} exceeded: {detail}", QUOTA_RETRY_AFTER_S)
        self.quota = quota


class TenantNotFound(NotFound):
    """Another tenant's settings asked for by a key that is not an operator's (as an unknown id)."""

    def __init__(self, tenant: str) -> None:
        super().__init__(f"no tenant {tenant}", tenant)


class QuotaInvalid(Invalid):
    """One job over a per-job quota (422 naming the field and the quota)."""

    def __init__(self, quota: str, detail: str, field: tuple[str | int, ...], value: Any) -> None:
        super().__init__(f"quota {quota} exceeded: {detail}", field, kind="quota_exceeded", value=value)
        self.quota = quota


@dataclass(frozen=True)
class JobSize:
    """One job's `JobDemand` (shards or lease-frontier items, key-space records) and where the
    job is in the request body (`("body",)`; a chain's step: `("body", "steps", i)`), for the
    field a per-job refusal names."""

    demand: JobDemand
    at: tuple[str | int, ...] = ("body",)


@dataclass(frozen=True)
class TenantService:
    """Tenants' settings in `tenants` (Cairn's database `db`), with `defaults` for what a tenant
    leaves unset."""

    db: AsyncDatabase
    defaults: TenantQuotas

    def namespace(self, tenant: str) -> str:
        """The name of the tenant's namespace database (its records and its own sources)."""
        return tenant_database(self.db.name, tenant)

    async def record(self, tenant: str) -> TenantRecord:
        """The tenant's stored settings (defaults if none were set)."""
        return TenantRecord.of(await self.db[TENANTS].find_one({"_id": tenant}))

    async def quotas(self, tenant: str) -> TenantQuotas:
        """The tenant's effective quotas: its own, else the deployment's defaults."""
        return (await self.record(tenant)).quotas.merged(self.defaults)

    async def put(self, tenant: str, record: TenantRecord) -> TenantRecord:
        """Replace the tenant's settings. Raises `Invalid` for a grant of Cairn's database or of a
        tenant namespace (`["body", "sources", i, "database"]`): a grant opens a database to one
        tenant, and those belong to Cairn or to a tenant already."""
        for index, grant in enumerate(record.sources):
            if is_tenant_database(self.db.name, grant.database):
                raise Invalid(
                    f"{grant.database!r} is Cairn's database or a tenant's namespace: it cannot be granted",
                    ("body", "sources", index, "database"),
                    value=grant.database,
                )
        document = {**record.model_dump(mode="json"), "updated_at_ms": clock.now_ms()}
        await replace_or_insert(self.db[TENANTS], tenant, document)
        logger.info("tenant %s: quotas %s, %d source grant(s)", tenant, record.quotas.model_dump(exclude_none=True), len(record.sources))
        return record

    async def check_submit(self, tenant: str, *sizes: JobSize) -> None:
        """Refuse jobs over one of the tenant's quotas: one job, or a chain's steps (one size
        each; every step is an unfinished job from the moment the chain is recorded). Raises
        `QuotaInvalid` (422) for a per-job quota and `QuotaExceeded` (429) when the tenant's
        unfinished jobs and these would be more than it may run at once."""
        quotas = await self.quotas(tenant)
        for size in sizes:
            check_job_size(quotas, size)
        await self._check_running(tenant, quotas, len(sizes), "submits")

    async def room(self, tenant: str, reopening: int = 0) -> int | None:
        """How many more unfinished jobs the tenant may have now (None: no limit), counting
        `reopening` jobs about to run again (DLQ replays not handled yet) as unfinished."""
        quotas = await self.quotas(tenant)
        if quotas.max_running_jobs is None:
            return None
        return max(0, quotas.max_running_jobs - await self._running(tenant) - reopening)

    async def _running(self, tenant: str) -> int:
        return await self.db[JOBS].count_documents({"tenant": tenant, "state": {"$in": state_values(ACTIVE_JOB_STATES)}})

    async def _check_running(self, tenant: str, quotas: TenantQuotas, adding: int, verb: str) -> None:
        if quotas.max_running_jobs is None:
            return
        running = await self._running(tenant)
        if running + adding > quotas.max_running_jobs:
            raise QuotaExceeded(
                "max_running_jobs",
                f"tenant {tenant!r} has {running} unfinished job(s) and {verb} {adding}; at most {quotas.max_running_jobs} at once",
            )

    async def source_database(
        self, tenant: str, database: str | None, collection: str, at: tuple[str | int, ...] = ("body",)
    ) -> AsyncDatabase:
        """Where a `mongo_range` job of the tenant reads `collection`: the tenant's namespace, or
        `database` if an operator granted `database.collection` to the tenant. Raises `Invalid`
        on `(*at, "params", "database")` for a database not granted (`at`: where the job is in
        the request body)."""
        if database is None:
            return self.db.client[self.namespace(tenant)]
        # Cairn's database and tenant namespaces are never granted (`put` refuses them; a grant
        # written by hand is refused here too, as the worker does).
        if is_tenant_database(self.db.name, database) or not (await self.record(tenant)).grants(database, collection):
            raise Invalid(
                f"database {database!r} (collection {collection!r}) is not granted to tenant {tenant!r}: "
                "a job reads its tenant's namespace unless an operator grants a source",
                (*at, "params", "database"),
                kind="source_not_granted",
                value=database,
            )
        return self.db.client[database]


def check_job_size(quotas: TenantQuotas, size: JobSize) -> None:
    """Raises `QuotaInvalid` (naming the quota and the field) if one job is over a per-job quota:
    `sharding.shards` (`sharding.item_size` for a lease frontier) or `params`."""
    over = size.demand.over(quotas)
    if over is None:
        return
    quota, detail = over
    if quota == "max_shards_per_job":
        raise QuotaInvalid(quota, detail, (*size.at, "sharding", "item_size" if size.demand.items else "shards"), size.demand.shards)
    raise QuotaInvalid(quota, detail, (*size.at, "params"), size.demand.records)


async def replace_or_insert(collection: AsyncCollection, key: str, document: dict[str, Any]) -> None:
    """Replace the document `_id` = `key` whole, or insert it: a PUT. Not `update_one($set,
    upsert)` (the stand-in stores a `$set` list of documents as JSON text) nor `replace_one(upsert)`
    (the stand-in inserts nothing): replace, else insert, else (a concurrent PUT inserted it) replace."""
    if (await collection.replace_one({"_id": key}, document)).matched_count:
        return
    try:
        await collection.insert_one({"_id": key, **document})
    except DuplicateKeyError:
        await collection.replace_one({"_id": key}, document)
