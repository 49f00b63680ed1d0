"""Where a shard writes and reads (issue 15): its tenant's namespace, or a granted source only."""

import uuid

import pytest

from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_contracts.tenancy import TENANTS, tenant_database
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.pipelines.mongo_range import MongoRangeParams, MongoRangePipeline
from cairn_ingest_worker.runner import ShardRunner, _context
from cairn_ingest_worker.tenancy import SourceNotGranted, TenantNamespaces
from cairn_sdk import NonRetryableError, RunContext


def runner(db) -> ShardRunner:
    return ShardRunner(
        leases=ShardLeases(db[SHARDS], db[CHECKPOINTS], "w-test", 30, jobs=db[JOBS]),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,
        source_db=db,
        heartbeat_interval_s=5,
        slice_s=600,
        namespaces=TenantNamespaces(db),
    )


def test_a_jobs_records_sources_and_raw_pages_are_in_its_tenants_namespace(mongo_db) -> None:
    wired = runner(mongo_db)
    claim = type("Claim", (), {"attempt": 1, "shard_key": "j:0000", "token": 1})()
    context = _context(wired, claim, {"_id": "j", "tenant": "acme"})  # type: ignore[arg-type]
    acme = tenant_database(mongo_db.name, "acme")
    assert context.source_db.name == context.store_db.name == acme != mongo_db.name
    assert wired.databases("acme")[0].name == acme
    assert wired.databases("globex")[0].name == tenant_database(mongo_db.name, "globex") != acme
    assert wired.databases(None)[0].name == tenant_database(mongo_db.name, "default")


def test_a_source_database_is_read_only_while_it_is_granted(mongo_db) -> None:
    tenant, warehouse = f"t{uuid.uuid4().hex[:6]}", f"{mongo_db.name}_wh"
    namespaces = TenantNamespaces(mongo_db)
    context = RunContext(tenant=tenant, granted=lambda database, collection: namespaces.granted(tenant, database, collection))
    params = MongoRangeParams(collection="sales", database=warehouse, start=0, end=9)
    with pytest.raises(SourceNotGranted, match=warehouse):
        MongoRangePipeline(params, context)
    mongo_db[TENANTS].insert_one({"_id": tenant, "sources": [{"database": warehouse, "collection": "sales"}]})
    assert context.source(warehouse, "sales").name == warehouse
    with pytest.raises(SourceNotGranted):  # another collection of the granted database is not granted
        context.source(warehouse, "payroll")
    grants = [{"database": warehouse, "collection": "sales"}, {"database": mongo_db.name, "collection": "jobs"}]
    mongo_db[TENANTS].replace_one({"_id": tenant}, {"sources": grants})
    with pytest.raises(SourceNotGranted):  # Cairn's own database never is, even written by hand
        context.source(mongo_db.name, "jobs")
    mongo_db[TENANTS].delete_one({"_id": tenant})  # revoked: the next run of the job stops
    with pytest.raises(SourceNotGranted):
        context.source(warehouse, "sales")


def test_without_a_grant_check_no_other_database_is_read() -> None:
    with pytest.raises(NonRetryableError, match="not granted"):
        RunContext().source("warehouse", "sales")
