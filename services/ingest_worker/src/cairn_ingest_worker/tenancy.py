"""Where a job's shard writes its records and reads its sources: its tenant's namespace.

A job's records go to its tenant's namespace database (`cairn_contracts.tenancy.tenant_database`,
beside Cairn's), so two tenants ingesting the same keys store them separately and no job can
write into Cairn's control collections or into another tenant's data. A pipeline's own sources
(`RunContext.source_db`) and what it keeps besides records (`RunContext.store_db`: http_json's raw
pages) are in the same namespace. A source outside it is read only where an operator granted that
database.collection to the tenant (`tenants` collection); the grant is checked at every run
(`granted`), so a revoked grant stops a scheduled job's next run too.
"""

from dataclasses import dataclass

from pymongo.database import Database

from cairn_contracts.store import DEFAULT_TENANT
from cairn_contracts.tenancy import TENANTS, TenantRecord, is_tenant_database, tenant_database
from cairn_sdk import NonRetryableError


class SourceNotGranted(NonRetryableError):
    """The job names a source database its tenant was not granted (or no longer is)."""


@dataclass(frozen=True)
class TenantNamespaces:
    """Resolves a job's databases; `control_db` is Cairn's (jobs, tenants, ...)."""

    control_db: Database

    def records_db(self, tenant: str | None) -> Database:
        """The tenant's namespace database: its records (every `target_collection`), its own
        sources and its raw pages."""
        return self.control_db.client[tenant_database(self.control_db.name, tenant or DEFAULT_TENANT)]

    def granted(self, tenant: str | None, database: str, collection: str) -> Database:
        """`database`, if an operator granted `database.collection` to the tenant. Raises
        `SourceNotGranted` otherwise (and always for Cairn's database or a tenant namespace,
        which the gateway never lets anyone grant: a hand-written grant changes nothing)."""
        tenant = tenant or DEFAULT_TENANT
        record = TenantRecord.of(self.control_db[TENANTS].find_one({"_id": tenant}))
        if is_tenant_database(self.control_db.name, database) or not record.grants(database, collection):
            raise SourceNotGranted(f"source database {database!r} is not granted to tenant {tenant!r} for collection {collection!r}")
        return self.control_db.client[database]
