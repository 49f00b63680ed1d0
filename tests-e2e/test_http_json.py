"""Issue 13 acceptance, http_json: a job over 200 pages of a real local paged API (started here,
on 127.0.0.1) with injected 429s, 500s, a read timeout, a malformed page and a worker SIGKILLed
mid-job stores every record exactly once; re-run after the source changed 10 records, it updates
exactly those 10 (upsert) and says so.

Its own system: two ingest workers of one pool process each (a kill takes out exactly the worker
holding a shard), short leases so the killed worker's shard is taken over within seconds, and the
API's bearer token as a worker secret (never in the job spec, never in a log).
"""

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cairn_testkit.paged_server import PagedApi, PagedServer
from harness import System, dump

PAGES, PAGE_SIZE = 200, 25
TOTAL = PAGES * PAGE_SIZE
TOKEN = "e2e-paged-api-token-4f1c"
ENV = {
    "CAIRN_WORKER_CONCURRENCY": "1",
    "CAIRN_LEASE_TTL_S": "3",
    "CAIRN_HEARTBEAT_INTERVAL_S": "0.5",
    "CAIRN_MAX_ATTEMPTS": "6",
    # Bound to the test API's host: sent there only, whoever submits the job.
    "CAIRN_SECRETS": json.dumps({"paged_api": {"value": f"Bearer {TOKEN}", "hosts": ["127.0.0.1"]}}),
    "CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS": "true",  # the test API listens on loopback
}


@pytest.fixture(scope="module")
def paged_api() -> Iterator[PagedServer]:
    # 30 ms an answer: 200 pages take a few seconds per worker, long enough to kill one mid-shard.
    with PagedServer(PagedApi(total=TOTAL, default_page_size=PAGE_SIZE, token=TOKEN, latency_s=0.03)) as server:
        yield server


@pytest.fixture(scope="module")
def http_system(system_factory: Callable[..., System]) -> System:
    return system_factory("http", workers=2, overrides=ENV)


def job_spec(base_url: str, collection: str) -> dict[str, Any]:
    return {
        "pipeline": "http_json",
        "params": {
            "url": f"{base_url}/pages",
            "paging": "page",
            "page_size": PAGE_SIZE,
            "start": 1,
            "end": PAGES + 1,  # pages 1..200, split into shards by page range
            "records_path": "data.items",
            "id_path": "id",
            "auth_secret": "paged_api",
            "rate_limit": "500/second",
            "read_timeout_s": 1.0,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.5,
        },
        "sharding": {"strategy": "range", "shards": 4},
        "batch_size": 2 * PAGE_SIZE,  # two pages a batch, one checkpoint each
        "write_mode": "upsert",
        "target_collection": collection,
    }


def page_offset(page: int) -> int:
    return (page - 1) * PAGE_SIZE


def running_shard(system: System, job_id: str, worker_id: str) -> dict | None:
    """A shard the worker is in the middle of: at least one batch committed under its lease."""
    for shard in system.db.shards.find({"job_id": job_id, "state": "RUNNING"}):
        if not str(shard.get("taken_by") or "").startswith(f"{worker_id}/"):
            continue
        checkpoint = system.db.checkpoints.find_one({"shard_key": shard["shard_key"]})
        if checkpoint and checkpoint["fencing_token"] == shard["fencing_token"] and checkpoint["batches"] >= 1:
            return shard
    return None


def test_http_json_job_survives_faults_and_a_killed_worker_then_upserts_exactly_the_changed_records(
    http_system: System, paged_api: PagedServer
) -> None:
    system, api = http_system, paged_api.api
    # Faults on pages of every shard: two 429s asking for a 1 s pause, 500 and 503, a read that
    # outlasts the 1 s read timeout, a truncated body.
    api.inject(at=page_offset(12), kind="status", status=429, retry_after="1", times=2)
    api.inject(at=page_offset(63), kind="status", status=500)
    api.inject(at=page_offset(110), kind="status", status=503, times=2)
    api.inject(at=page_offset(140), kind="delay", delay_s=2.5)
    api.inject(at=page_offset(177), kind="malformed")

    collection = "http_pages"
    job_id = system.start_job(job_spec(paged_api.base_url, collection))
    shard = system.wait_for(lambda: running_shard(system, job_id, "worker-1"), "worker-1 mid-shard", 120)
    system.services["ingest_worker"].kill()
    system.services["ingest_worker"].start()

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    target = system.records(collection)
    assert target.count_documents({}) == TOTAL
    assert final["writes"]["inserted"] == TOTAL, dump(final)  # a batch redone after the kill inserted nothing twice
    assert sorted(d["_id"] for d in target.find({}, {"_id": 1})) == [f"rec-{i:06d}" for i in range(TOTAL)]
    assert api.pending_faults() == 0, "every injected fault was met"
    statuses = [status for _, _, status in api.served]
    assert statuses.count(429) == 2 and statuses.count(500) == 1 and statuses.count(503) == 2
    checkpoints = list(system.db.checkpoints.find({"job_id": job_id}))
    # Each shard ended at the end of its page range: its cursor is past its one start URL.
    assert len(checkpoints) == 4 and all(c["cursor"]["item"] == 1 for c in checkpoints), dump(checkpoints)
    # records_done counts committed batches only: a restart from scratch would pass the total.
    assert sum(c["records_done"] for c in checkpoints) == TOTAL, dump(checkpoints)
    taken_over = system.db.shards.find_one({"_id": shard["shard_key"]})
    assert taken_over["state"] == "SUCCEEDED" and taken_over["fencing_token"] >= 2, dump(taken_over)
    # The rate limit's windows were kept in the shared Redis, under the run's prefix.
    client = redis.Redis.from_url(system.env["CAIRN_REDIS_URL"])
    try:
        assert client.keys(f"{system.env['CAIRN_REDIS_PREFIX']}:ratelimit*")
    finally:
        client.close()

    # The source changes 10 records; the same job again updates exactly those.
    changed = [3, 77, 1234, 2000, 2001, 3333, 4100, 4567, 4998, 4999]
    api.change(changed)
    rerun = system.start_job(job_spec(paged_api.base_url, collection))
    again = system.wait_for_state(rerun, {"SUCCESS", "FAILURE"}, timeout_s=300)
    assert again["state"] == "SUCCESS", dump(again) + system.logs()
    assert again["writes"]["updated"] == 10 and again["writes"]["inserted"] == 0, dump(again)
    assert again["writes"]["unchanged"] == TOTAL - 10, dump(again)
    assert target.count_documents({}) == TOTAL
    assert sorted(d["seq"] for d in target.find({"version": 2}, {"seq": 1})) == changed
    assert target.find_one({"_id": "rec-001234"})["name"] == "record 1234 (v2)"

    # The secret was sent (the API requires it) but never written to a log.
    assert all(TOKEN not in service.log_path.read_text(errors="replace") for service in system.services.values())


@pytest.mark.parametrize("space", ["work_items", "time_windows"])
def test_http_json_shards_by_start_urls_or_time_windows(http_system: System, paged_api: PagedServer, space: str) -> None:
    system, base = http_system, paged_api.base_url
    common = {"records_path": "data.items", "auth_secret": "paged_api", "page_size": PAGE_SIZE}
    if space == "work_items":
        # Three start URLs followed by their Link headers, raw pages kept in GridFS.
        cuts = [(0, 300), (300, 450), (450, 600)]
        params = {**common, "paging": "link", "keep_raw": True, "urls": [f"{base}/link?from={a}&to={b}&per_page={PAGE_SIZE}" for a, b in cuts]}
        expected = range(0, 600)
    else:
        # Records are a minute apart from 2026-01-01T00:00Z: 10 hours hold records 600..1199.
        params = {**common, "url": f"{base}/cursor", "paging": "cursor", "since": "2026-01-01T10:00:00Z", "until": "2026-01-01T20:00:00Z"}
        expected = range(600, 1200)
    collection = f"http_{space}"
    job_id = system.start_job(
        {
            "pipeline": "http_json",
            "params": params,
            "sharding": {"strategy": "range", "shards": 3},
            "batch_size": 4 * PAGE_SIZE,
            "write_mode": "upsert",
            "target_collection": collection,
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=180)
    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    stored = list(system.records(collection).find({}, {"_id": 1, "raw_payload_id": 1}))
    assert sorted(d["_id"] for d in stored) == [f"rec-{i:06d}" for i in expected]
    assert final["writes"]["inserted"] == len(expected)
    if space == "work_items":
        pointers = {d["raw_payload_id"] for d in stored}
        assert len(pointers) == 600 // PAGE_SIZE  # one raw page per page fetched, stored once
        # Raw pages are the tenant's data: kept in its namespace, never in Cairn's database.
        assert system.records("raw_payloads").count_documents({"_id": {"$in": sorted(pointers)}}) == len(pointers)
        assert system.db.raw_payloads.count_documents({"_id": {"$in": sorted(pointers)}}) == 0


@pytest.mark.parametrize(
    "params,field",
    [
        ({"url": "http://127.0.0.1:9/pages", "headers": {"Authorization": "Bearer leaked"}}, "headers"),
        ({"url": "http://127.0.0.1:9/pages", "rate_limit": "lots"}, "rate_limit"),
        ({"url": "ftp://127.0.0.1/pages"}, "url"),
        ({"url": "http://127.0.0.1:9/pages", "paging": "sideways"}, "paging"),
    ],
)
def test_bad_http_json_params_are_refused_by_the_gateway_naming_the_field(http_system: System, params: dict, field: str) -> None:
    with http_system.client() as client:
        response = client.post("/task/start", json={"pipeline": "http_json", "params": params, "target_collection": "never"})
    assert response.status_code == 422, response.text
    assert field in response.text, response.text
    assert "leaked" not in response.text  # a refused secret is not echoed back
