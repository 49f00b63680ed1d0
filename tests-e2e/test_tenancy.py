"""Issue 15 acceptance against the running services: every storage attack of the issue is refused
or stored apart (control collections as target or source, another tenant's namespace, the same
keys from two tenants), and fair dispatch (a small job of one tenant finishes while another
tenant's large job saturates the workers)."""

import uuid

import httpx
import pytest

from cairn_contracts.tenancy import tenant_database
from harness import System


def tenant_name(label: str) -> str:
    return f"{label}{uuid.uuid4().hex[:6]}"


def refused(client: httpx.Client, body: dict, loc: list) -> str:
    """POSTs a job that must be refused with a 422 naming `loc`; returns the message."""
    answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["detail"][0]
    assert error["loc"] == loc, error
    return error["msg"]


def finished(system: System, client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    def done() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("SUCCESS", "FAILURE", "CANCELLED") else None

    return system.wait_for(done, f"job {job_id} to finish", timeout_s=timeout_s, poll_s=0.2)


@pytest.mark.parametrize("control", ["jobs", "shards", "api_keys", "tenants"])
def test_a_control_collection_is_refused_as_target_and_as_source(system: System, control: str) -> None:
    with system.client_for(tenant_name("ctl")) as client:
        synthetic = {"pipeline": "synthetic", "params": {"count": 10}, "target_collection": control}
        assert "Cairn's own" in refused(client, synthetic, ["body", "target_collection"])
        copy = {"pipeline": "mongo_range", "params": {"collection": control, "start": 0, "end": 10}}
        assert "Cairn's own" in refused(client, copy, ["body", "params", "collection"])
        # Not through a granted database either: Cairn's own database can never be granted.
        copy["params"]["database"] = system.db.name
        assert "Cairn's own" in refused(client, copy, ["body", "params", "collection"])


def test_another_tenants_namespace_is_out_of_reach(system: System) -> None:
    victim, attacker = tenant_name("victim"), tenant_name("attacker")
    system.records("secrets", victim).insert_many([{"_id": k, "secret": f"s{k}"} for k in range(5)])
    with system.client_for(attacker) as client:
        copy = {"pipeline": "mongo_range", "params": {"collection": "secrets", "start": 0, "end": 10}, "target_collection": "loot"}
        # By name: the attacker's jobs read the attacker's namespace, where no such collection is.
        assert "does not exist" in refused(client, copy, ["body", "params", "collection"])
        # By database: the victim's namespace is not granted to the attacker.
        copy["params"]["database"] = tenant_database(system.db.name, victim)
        assert "not granted" in refused(client, copy, ["body", "params", "database"])
    assert system.records("loot", attacker).count_documents({}) == 0


def test_the_same_keys_from_two_tenants_are_stored_separately(system: System) -> None:
    tenants = [tenant_name("same"), tenant_name("same")]
    body = {"pipeline": "synthetic", "params": {"count": 300}, "sharding": {"shards": 2}, "target_collection": "records"}
    for tenant in tenants:
        with system.client_for(tenant) as client:
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            job = finished(system, client, job_id)
            assert job["state"] == "SUCCESS", job
            result = client.get(f"/v1/jobs/{job_id}/result").json()["result"]
            assert (result["records_written"], result["records_redone"]) == (300, 0)  # the second tenant's too
    for tenant in tenants:
        assert system.records("records", tenant).count_documents({}) == 300
    assert "records" not in system.db.list_collection_names(filter={"name": "records"})  # nothing beside Cairn's control data


def test_a_granted_source_of_another_database_is_readable_by_that_tenant_only(system: System) -> None:
    tenant, other = tenant_name("granted"), tenant_name("other")
    warehouse = f"{system.db.name}_warehouse"
    system.db.client[warehouse]["sales"].insert_many([{"_id": k, "amount": k} for k in range(20)])
    operator = system.client(system.create_key(tenant_name("ops"), "operator", name="operator"))
    try:
        grant = {"sources": [{"database": warehouse, "collection": "sales"}]}
        assert operator.put(f"/v1/tenants/{tenant}", json=grant).status_code == 200
        copy = {"pipeline": "mongo_range", "params": {"collection": "sales", "database": warehouse, "start": 0, "end": 20}, "target_collection": "sales"}
        with system.client_for(tenant) as client:
            job_id = client.post("/v1/jobs", json=copy).json()["id"]
            assert finished(system, client, job_id)["state"] == "SUCCESS"
        assert system.records("sales", tenant).count_documents({}) == 20
        with system.client_for(other) as client:
            assert "not granted" in refused(client, copy, ["body", "params", "database"])
    finally:
        operator.close()
        system.db.client.drop_database(warehouse)


def test_a_small_job_of_one_tenant_is_not_starved_by_another_tenants_large_job(system: System) -> None:
    """Tenant A's 60-shard job, capped at 2 shards in flight, saturates the workers (2 pool
    processes); tenant B's 1-shard job submitted meanwhile finishes while most of A's shards
    still wait. Without fair dispatch B's task would queue behind all of A's (same priority)."""
    big, small = tenant_name("big"), tenant_name("small")
    operator = system.client(system.create_key(tenant_name("ops"), "operator", name="operator"))
    a, b = system.client_for(big), system.client_for(small)
    try:
        assert operator.put(f"/v1/tenants/{big}", json={"quotas": {"max_in_flight_shards": 2}}).status_code == 200
        shards = 60
        large = {
            "pipeline": "synthetic",
            "params": {"count": shards * 40, "delay_ms_per_record": 10},  # about 0.4 s a shard
            "sharding": {"shards": shards},
            "batch_size": 20,
        }
        large_id = a.post("/v1/jobs", json=large).json()["id"]

        def in_flight() -> int:
            return system.db.shards.count_documents({"job_id": large_id, "state": {"$in": ["QUEUED", "RUNNING"]}})

        system.wait_for(lambda: system.db.shards.count_documents({"job_id": large_id, "state": "RUNNING"}) >= 2, "A saturates the workers")
        assert in_flight() <= 2
        small_id = b.post("/v1/jobs", json={"pipeline": "synthetic", "params": {"count": 50}}).json()["id"]
        job = finished(system, b, small_id, timeout_s=60)
        assert job["state"] == "SUCCESS", job
        done_of_a = system.db.shards.count_documents({"job_id": large_id, "state": "SUCCEEDED"})
        assert done_of_a <= shards // 2, f"B finished only after {done_of_a} of A's {shards} shards"
        assert in_flight() <= 2
        # The operator sees both tenants' jobs; each tenant sees only its own.
        seen = {job["id"]: job["tenant"] for job in operator.get("/v1/jobs", params={"limit": 200}).json()["items"]}
        assert seen[large_id] == big and seen[small_id] == small
        assert a.get(f"/v1/jobs/{small_id}").status_code == 404
        assert finished(system, a, large_id, timeout_s=180)["state"] == "SUCCESS"
    finally:
        for client in (operator, a, b):
            client.close()


def test_quotas_refuse_jobs_over_them_with_a_4xx_naming_the_quota(system: System) -> None:
    tenant = tenant_name("quota")
    operator = system.client(system.create_key(tenant_name("ops"), "operator", name="operator"))
    client = system.client_for(tenant)
    try:
        quotas = {"max_running_jobs": 1, "max_shards_per_job": 2, "max_records_per_job": 1000}
        assert client.put(f"/v1/tenants/{tenant}", json={"quotas": quotas}).status_code == 403  # only an operator sets them
        assert operator.put(f"/v1/tenants/{tenant}", json={"quotas": quotas}).status_code == 200

        body = {"pipeline": "synthetic", "params": {"count": 1000, "delay_ms_per_record": 20}, "batch_size": 10}
        assert "max_shards_per_job" in refused(client, {**body, "sharding": {"shards": 4}}, ["body", "sharding", "shards"])
        assert "max_records_per_job" in refused(client, {**body, "params": {"count": 5000}}, ["body", "params"])

        running = client.post("/v1/jobs", json=body)
        assert running.status_code == 202, running.text
        over = client.post("/v1/jobs", json={**body, "name": "a second one"})
        assert over.status_code == 429, over.text
        assert "max_running_jobs" in over.json()["detail"] and over.headers.get("Retry-After")
        # Within the quota again once the running job has ended.
        assert client.post(f"/v1/jobs/{running.json()['id']}/cancel").status_code == 202
        finished(system, client, running.json()["id"])
        assert client.post("/v1/jobs", json={**body, "name": "after"}).status_code == 202
    finally:
        operator.close()
        client.close()
