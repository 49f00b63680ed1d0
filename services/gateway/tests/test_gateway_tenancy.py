"""Tenancy at the gateway (issue 15), through ASGI against this run's real MongoDB-wire server,
RabbitMQ vhost and Redis: the cross-tenant `operator` scope, per-tenant quotas (429/422 naming
the quota), and where a mongo_range job may read (its tenant's namespace, or a granted source)."""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from pymongo.database import Database

from cairn_contracts.states import DeadLetterStatus, JobState
from cairn_contracts.store import TASK_ERRORS
from cairn_contracts.tenancy import tenant_database
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS
from cairn_gateway import admin
from cairn_testkit.aio import drain


def spec(**changes) -> dict:
    return {"pipeline": "synthetic", "params": {"count": 100}, "name": f"job {uuid.uuid4().hex[:10]}", **changes}


@pytest.fixture
async def make_client(client_for, broker) -> AsyncIterator:
    """`make_client(tenant, *scopes)`: a client with a new key of `tenant` (submit, read by default)."""
    yield lambda tenant, *scopes: client_for(tenant, scopes or ("submit", "read"), f"{tenant} key")
    await drain(broker.queues[QUEUE_SCHEDULER_COMMANDS])  # the StartJob commands of the jobs submitted


def dead_letter(db: Database, tenant: str, job_id: str) -> str:
    entry_id = f"dl-{uuid.uuid4().hex[:10]}"
    db[TASK_ERRORS].insert_one(
        {
            "_id": entry_id,
            "kind": "service",
            "status": DeadLetterStatus.OPEN,
            "reason": "non_retryable",
            "error_type": "ValueError",
            "error_message": "bad",
            "job_id": job_id,
            "shard_key": f"{job_id}:0000",
            "pipeline": "synthetic",
            "tenant": tenant,
            "attempts": 1,
            "original": {"body": "{}", "body_encoding": "utf-8", "headers": {}, "routing_key": "ingest"},
            "created_at": datetime.now(UTC),
            "replays": [],
        }
    )
    return entry_id


# --- operator ------------------------------------------------------------------------------------
async def test_an_operator_sees_every_tenants_jobs_and_dead_letters_and_tenants_still_do_not(make_client, db) -> None:
    tenant_a, tenant_b = f"a{uuid.uuid4().hex[:6]}", f"b{uuid.uuid4().hex[:6]}"
    a, b = make_client(tenant_a, "admin"), make_client(tenant_b, "admin")
    operator = make_client(f"ops{uuid.uuid4().hex[:6]}", "operator")
    job_a = (await a.post("/v1/jobs", json=spec())).json()["id"]
    job_b = (await b.post("/v1/jobs", json=spec())).json()["id"]
    entry_a, entry_b = dead_letter(db, tenant_a, job_a), dead_letter(db, tenant_b, job_b)

    listed = {job["id"]: job["tenant"] for job in (await operator.get("/v1/jobs", params={"limit": 200})).json()["items"]}
    assert listed[job_a] == tenant_a and listed[job_b] == tenant_b
    assert (await operator.get(f"/v1/jobs/{job_b}")).status_code == 200
    assert (await operator.get(f"/task/status/{job_a}")).json()["state"] == JobState.PENDING
    assert (await operator.get("/v1/jobs/counts")).json()["total"] >= 2
    assert (await a.get("/v1/jobs/counts")).json()["total"] == 1
    entries = {e["id"]: e["tenant"] for e in (await operator.get("/dlq/entries", params={"limit": 500})).json()["items"]}
    assert entries[entry_a] == tenant_a and entries[entry_b] == tenant_b
    assert (await operator.get(f"/dlq/entries/{entry_b}")).status_code == 200

    # A tenant's admin still sees its own tenant only: the other's ids answer 404.
    assert job_b not in {job["id"] for job in (await a.get("/v1/jobs", params={"limit": 200})).json()["items"]}
    assert (await a.get(f"/v1/jobs/{job_b}")).status_code == 404
    assert (await a.get(f"/task/status/{job_b}")).status_code == 404
    assert entry_b not in {e["id"] for e in (await a.get("/dlq/entries", params={"limit": 500})).json()["items"]}
    assert (await a.get(f"/dlq/entries/{entry_b}")).status_code == 404
    assert (await a.post(f"/dlq/entries/{entry_b}/discard")).status_code == 404

    # The operator acts on any tenant's dead letter; the command is recorded under the entry's tenant.
    discarded = await operator.post(f"/dlq/entries/{entry_b}/discard", json={"note": "operator"})
    assert discarded.status_code == 202, discarded.text
    assert db["dlq_commands"].find_one({"_id": discarded.json()["command_id"]})["tenant"] == tenant_b


async def test_only_an_operator_may_create_an_operator_key(make_client, db) -> None:
    tenant = f"k{uuid.uuid4().hex[:6]}"
    tenant_admin = make_client(tenant, "admin")
    refused = await tenant_admin.post("/v1/keys", json={"scopes": ["operator"], "name": "escalate"})
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    spelled = await tenant_admin.post("/v1/keys", json={"scopes": [" operator", "read"], "name": "escalate"})
    assert spelled.status_code == 403
    operator = make_client(tenant, "operator")
    created = await operator.post("/v1/keys", json={"scopes": ["operator"], "name": "second operator"})
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == ["operator"]
    # The bootstrap command line accepts the scope too.
    token = admin.create_key(db, tenant, ["operator"], "cli operator")
    assert token.startswith("cairn_")


# --- quotas --------------------------------------------------------------------------------------
async def test_quotas_refuse_a_job_over_them_naming_the_quota(make_client) -> None:
    tenant = f"q{uuid.uuid4().hex[:6]}"
    client = make_client(tenant, "admin")
    operator = make_client(f"ops{uuid.uuid4().hex[:6]}", "operator")
    quotas = {"max_running_jobs": 1, "max_shards_per_job": 4, "max_records_per_job": 1000}
    assert (await client.put(f"/v1/tenants/{tenant}", json={"quotas": quotas})).status_code == 403  # a tenant's admin cannot
    put = await operator.put(f"/v1/tenants/{tenant}", json={"quotas": quotas})
    assert put.status_code == 200, put.text
    assert put.json()["effective_quotas"]["max_running_jobs"] == 1
    assert (await client.get(f"/v1/tenants/{tenant}")).json()["quotas"]["max_shards_per_job"] == 4  # its own: readable
    assert (await client.get(f"/v1/tenants/{tenant}x")).status_code == 404  # another's: as unknown

    shards = await client.post("/v1/jobs", json=spec(sharding={"shards": 8}))
    assert shards.status_code == 422, shards.text
    assert shards.json()["detail"][0]["loc"] == ["body", "sharding", "shards"]
    assert "max_shards_per_job" in shards.json()["detail"][0]["msg"]
    records = await client.post("/v1/jobs", json=spec(params={"count": 5000}))
    assert records.status_code == 422, records.text
    assert records.json()["detail"][0]["loc"] == ["body", "params"]
    assert "max_records_per_job" in records.json()["detail"][0]["msg"]

    first = await client.post("/v1/jobs", json=spec())
    assert first.status_code == 202, first.text  # stays PENDING: no scheduler runs here
    second = await client.post("/v1/jobs", json=spec())
    assert second.status_code == 429, second.text
    assert "max_running_jobs" in second.json()["detail"]
    # Another tenant is not limited by this one's quota.
    assert (await make_client(f"o{uuid.uuid4().hex[:6]}").post("/v1/jobs", json=spec())).status_code == 202


# --- namespaces ----------------------------------------------------------------------------------
async def test_a_mongo_range_job_reads_its_tenants_namespace_or_a_granted_source_only(make_client, db, mongo_client) -> None:
    tenant, other = f"n{uuid.uuid4().hex[:6]}", f"m{uuid.uuid4().hex[:6]}"
    client = make_client(tenant)
    operator = make_client(f"ops{uuid.uuid4().hex[:6]}", "operator")
    db["shared_src"].insert_one({"_id": 1})  # in Cairn's database: not the tenant's namespace
    mongo_client[tenant_database(db.name, other)]["theirs"].insert_one({"_id": 1})
    own = mongo_client[tenant_database(db.name, tenant)]
    own["mine"].insert_one({"_id": 1})
    warehouse = f"{db.name}_warehouse"
    mongo_client[warehouse]["sales"].insert_one({"_id": 1})

    def job(**params) -> dict:
        return {"pipeline": "mongo_range", "params": {"start": 0, "end": 10, **params}, "name": uuid.uuid4().hex}

    async def refused(body: dict, loc: list) -> None:
        answer = await client.post("/v1/jobs", json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == loc

    await refused(job(collection="shared_src"), ["body", "params", "collection"])  # not in its namespace
    await refused(job(collection="theirs"), ["body", "params", "collection"])  # another tenant's: not found
    await refused(job(collection="theirs", database=tenant_database(db.name, other)), ["body", "params", "database"])
    await refused(job(collection="jobs", database=db.name), ["body", "params", "collection"])  # control collection
    await refused(job(collection="sales", database=warehouse), ["body", "params", "database"])  # not granted (yet)
    assert (await client.post("/v1/jobs", json=job(collection="mine"))).status_code == 202

    # An operator grants a named collection of another database; never Cairn's or a tenant's namespace.
    for database in (db.name, tenant_database(db.name, other)):
        grant = await operator.put(f"/v1/tenants/{tenant}", json={"sources": [{"database": database, "collection": "theirs"}]})
        assert grant.status_code == 422 and grant.json()["detail"][0]["loc"] == ["body", "sources", 0, "database"]
    granted = await operator.put(f"/v1/tenants/{tenant}", json={"sources": [{"database": warehouse, "collection": "sales"}]})
    assert granted.status_code == 200, granted.text
    assert (await client.post("/v1/jobs", json=job(collection="sales", database=warehouse))).status_code == 202
    mongo_client.drop_database(warehouse)


async def test_a_chain_is_held_to_the_tenants_quotas_as_its_jobs_are(make_client, db) -> None:
    # A chain records all its steps at once: each is an unfinished (WAITING) job of the tenant and
    # runs as a job, so the chain must not be a way round the running-jobs or per-job quotas.
    tenant = f"c{uuid.uuid4().hex[:6]}"
    client = make_client(tenant)
    operator = make_client(f"ops{uuid.uuid4().hex[:6]}", "operator")
    quotas = {"max_running_jobs": 2, "max_shards_per_job": 4, "max_records_per_job": 1000}
    assert (await operator.put(f"/v1/tenants/{tenant}", json={"quotas": quotas})).status_code == 200

    many = await client.post("/v1/chains", json={"steps": [spec() for _ in range(3)]})
    assert many.status_code == 429, many.text
    assert "max_running_jobs" in many.json()["detail"]
    shards = await client.post("/v1/chains", json={"steps": [spec(), spec(sharding={"shards": 8})]})
    assert shards.status_code == 422, shards.text
    assert shards.json()["detail"][0]["loc"] == ["body", "steps", 1, "sharding", "shards"]
    assert "max_shards_per_job" in shards.json()["detail"][0]["msg"]
    records = await client.post("/v1/chains", json={"steps": [spec(), spec(params={"count": 5000})]})
    assert records.status_code == 422, records.text
    assert records.json()["detail"][0]["loc"] == ["body", "steps", 1, "params"]
    assert db["jobs"].count_documents({"tenant": tenant}) == 0  # nothing recorded by the refusals

    body = {"steps": [spec(), spec()]}
    accepted = await client.post("/v1/chains", json=body, headers={"Idempotency-Key": "two"})
    assert accepted.status_code == 202, accepted.text
    # Its retry gets the chain (its own steps are not counted against it); one more job is a 429.
    assert (await client.post("/v1/chains", json=body, headers={"Idempotency-Key": "two"})).status_code in (200, 202)
    assert (await client.post("/v1/jobs", json=spec())).status_code == 429


async def test_a_chain_step_reading_another_tenants_or_an_ungranted_database_is_a_422(make_client) -> None:
    tenant = f"g{uuid.uuid4().hex[:6]}"
    client = make_client(tenant)
    step = {"pipeline": "mongo_range", "params": {"database": "warehouse", "collection": "sales", "start": 0, "end": 10}}
    answer = await client.post("/v1/chains", json={"steps": [spec(), step]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "steps", 1, "params", "database"]


async def test_a_schedules_job_is_held_to_the_per_job_quotas_and_to_granted_sources(make_client) -> None:
    # The runs a schedule fires are recorded by the scheduler, not submitted through the API: the
    # job they all run is checked when the schedule is created or its job changed.
    tenant = f"s{uuid.uuid4().hex[:6]}"
    client = make_client(tenant)
    operator = make_client(f"ops{uuid.uuid4().hex[:6]}", "operator")
    quotas = {"max_shards_per_job": 4, "max_records_per_job": 1000}
    assert (await operator.put(f"/v1/tenants/{tenant}", json={"quotas": quotas})).status_code == 200
    timing = {"kind": "interval", "interval_s": 60}

    async def refused(job: dict, loc: list, quota: str | None = None) -> None:
        answer = await client.post("/v1/schedules", json={**timing, "job": job})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == loc
        assert quota is None or quota in answer.json()["detail"][0]["msg"]

    await refused(spec(sharding={"shards": 8}), ["body", "job", "sharding", "shards"], "max_shards_per_job")
    await refused(spec(params={"count": 5000}), ["body", "job", "params"], "max_records_per_job")
    ungranted = {"pipeline": "mongo_range", "params": {"database": "warehouse", "collection": "sales", "start": 0, "end": 10}}
    await refused(ungranted, ["body", "job", "params", "database"])
    created = await client.post("/v1/schedules", json={**timing, "job": spec()})
    assert created.status_code == 201, created.text
    patched = await client.patch(f"/v1/schedules/{created.json()['id']}", json={"job": spec(sharding={"shards": 8})})
    assert patched.status_code == 422, patched.text
    assert patched.json()["detail"][0]["loc"] == ["body", "job", "sharding", "shards"]


@pytest.mark.parametrize("tenant", ["café", "a b", "*", "", "x" * 65, "ten/ant", ".", ".."])
def test_no_key_is_made_for_a_tenant_name_the_tenants_api_could_not_name(db: Database, tenant: str) -> None:
    # One rule (cairn_contracts.tenancy.TENANT_NAME_PATTERN) for keys and `/v1/tenants/{tenant}`:
    # a tenant of non-ASCII letters had keys but could not be configured over HTTP; "*" is every tenant.
    with pytest.raises(ValueError, match="tenant"):
        admin.create_key(db, tenant, ["admin"], "refused")
    assert db["api_keys"].count_documents({"name": "refused"}) == 0
