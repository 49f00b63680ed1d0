"""The http_json pipeline against a real local paged HTTP API (cairn_testkit.paged_server):
paging styles, work spaces, faults and retries, auth from a worker secret, the shared per-host
rate limit (real Redis) and raw pages in GridFS (real MongoDB-wire server)."""

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
import redis
from pydantic import ValidationError
from pymongo.database import Database

from cairn_ingest_worker.errors import is_retryable
from cairn_ingest_worker.http.fetch import FetchPolicy, MalformedPage, PageFetcher, PageUnavailable, RefusedUrl, build_client, retry_after_s
from cairn_ingest_worker.http.ratelimit import HostRateLimiter, parse_rate, redis_storage
from cairn_ingest_worker.http.raw_pages import RawPages
from cairn_ingest_worker.pipelines.http_json import HttpJsonParams, HttpJsonPipeline
from cairn_ingest_worker.settings import WorkerSettings
from cairn_sdk import Bounds, HttpStatusError, MissingSecret, NonRetryableError, RunContext, SecretNotAllowed, host_matches
from cairn_sdk.testing import bounds_of, drain
from cairn_testkit import fixtures
from cairn_testkit.fixtures import REDIS_URL
from cairn_testkit.paged_server import PagedApi, PagedServer

TOTAL = 237  # not a multiple of any page size used: the last page is short


@pytest.fixture
def api() -> Iterator[PagedServer]:
    with PagedServer(PagedApi(total=TOTAL)) as server:
        yield server


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["_id"] for r in records]


EVERY_ID = [f"rec-{i:06d}" for i in range(TOTAL)]
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


# --- paging styles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"paging": "page", "page_size": 50},
        {"paging": "offset", "page_size": 40},
        {"paging": "cursor", "page_size": 30, "next_cursor_path": "next_cursor"},
        {"paging": "link", "query": {"per_page": "25"}},
    ],
    ids=lambda p: p["paging"],
)
def test_each_paging_style_reads_every_record_once_in_order(api: PagedServer, params: dict[str, Any]) -> None:
    path = {"page": "/pages", "offset": "/offsets", "cursor": "/cursor", "link": "/link"}[params["paging"]]
    records = drain(HttpJsonPipeline, {"url": api.base_url + path, "records_path": "data.items", **params}, limit=60)
    assert ids(records) == EVERY_ID
    assert records[5]["name"] == "record 5"


def test_a_batch_is_whole_pages_and_its_cursor_resumes_after_them(api: PagedServer) -> None:
    params = HttpJsonParams(url=api.base_url + "/pages", records_path="data.items", page_size=50)
    pipeline = HttpJsonPipeline(params, RunContext(allow_private_networks=True))
    bounds = bounds_of(HttpJsonPipeline, params.model_dump(mode="json", exclude_none=True))
    first = pipeline.read(bounds, pipeline.start(bounds), limit=60)  # 60 records: two pages
    assert len(first.records) == 100 and not first.done
    assert first.cursor == {"item": 0, "next": 3}
    # A new process (a resumed shard) continues from the JSON cursor alone.
    resumed = HttpJsonPipeline(params, RunContext(allow_private_networks=True)).read(bounds, json.loads(json.dumps(first.cursor)), limit=1000)
    assert resumed.done and [r["id"] for r in first.records + resumed.records] == EVERY_ID


# --- work spaces -----------------------------------------------------------------------------


@pytest.mark.parametrize("paging,start,end,cuts", [("page", 1, 6, [1, 3, 6]), ("offset", 0, TOTAL, [0, 90, 200, TOTAL])])
def test_key_range_shards_split_pages_or_offsets_without_overlap(api: PagedServer, paging: str, start: int, end: int, cuts: list[int]) -> None:
    path = "/pages" if paging == "page" else "/offsets"
    params = {"url": api.base_url + path, "records_path": "data.items", "paging": paging, "page_size": 50, "start": start, "end": end}
    assert bounds_of(HttpJsonPipeline, params) == Bounds(start, end)
    stored: list[str] = []
    for low, high in zip(cuts, cuts[1:], strict=False):
        stored += ids(drain(HttpJsonPipeline, params, bounds=Bounds(low, high), limit=50))
    assert stored == EVERY_ID


def test_work_items_are_start_urls_each_paged_to_its_end(api: PagedServer) -> None:
    urls = [f"{api.base_url}/link?from={low}&to={high}&per_page=20" for low, high in [(0, 100), (100, 150), (150, TOTAL)]]
    params = {"urls": urls, "paging": "link", "records_path": "data.items"}
    assert bounds_of(HttpJsonPipeline, params).items == tuple(urls)
    first = drain(HttpJsonPipeline, params, bounds=Bounds(0, 2, items=tuple(urls[:2])))
    second = drain(HttpJsonPipeline, params, bounds=Bounds(2, 3, items=tuple(urls[2:])))
    assert ids(first + second) == EVERY_ID


def test_time_windows_are_sent_as_query_params(api: PagedServer) -> None:
    # Records are a minute apart from 2026-01-01T00:00Z: [01:00, 02:00) holds records 60..119.
    params = {
        "url": api.base_url + "/cursor",
        "paging": "cursor",
        "records_path": "data.items",
        "page_size": 25,
        "since": "2026-01-01T01:00:00Z",
        "until": "2026-01-01T03:00:00Z",
    }
    whole = bounds_of(HttpJsonPipeline, params)
    middle = whole.start + (whole.end - whole.start) // 2
    first = drain(HttpJsonPipeline, params, bounds=Bounds(whole.start, middle))
    second = drain(HttpJsonPipeline, params, bounds=Bounds(middle, whole.end))
    assert ids(first) == EVERY_ID[60:120] and ids(second) == EVERY_ID[120:180]


# --- faults: retries, Retry-After, timeouts, malformed pages -----------------------------------


def fetcher(policy: FetchPolicy, sleeps: list[float] | None = None, headers: dict[str, str] | None = None) -> PageFetcher:
    record = sleeps.append if sleeps is not None else (lambda _s: None)
    return PageFetcher(build_client(policy, headers, allow_private_networks=True), policy, sleep=record)


def test_retry_after_is_honoured_then_the_page_is_served(api: PagedServer) -> None:
    api.api.inject(at=0, kind="status", status=429, retry_after="2", times=2)
    sleeps: list[float] = []
    page = fetcher(FetchPolicy(**FAST), sleeps).get(api.base_url + "/offsets", {"offset": "0", "limit": "10"})
    assert len(page.body["data"]["items"]) == 10
    assert sleeps == [2.0, 2.0]
    assert [s for _, _, s in api.api.served] == [429, 429, 200]


def test_server_errors_timeouts_and_malformed_bodies_are_retried_with_backoff(api: PagedServer) -> None:
    api.api.inject(at=0, kind="status", status=500)
    api.api.inject(at=0, kind="delay", delay_s=1.5)
    api.api.inject(at=0, kind="malformed")
    sleeps: list[float] = []
    policy = FetchPolicy(read_timeout_s=0.3, **FAST)
    client = fetcher(policy, sleeps)
    page = client.get(api.base_url + "/offsets", {"offset": "0", "limit": "10"})
    assert page.body["data"]["items"][0]["id"] == "rec-000000"
    assert client.requests == 4 and client.retries == 3 and len(sleeps) == 3
    assert all(0 <= s <= 0.05 for s in sleeps)  # backoff within its ceiling (no Retry-After given)
    assert api.api.pending_faults() == 0


def test_when_the_tries_run_out_the_last_retryable_error_goes_up(api: PagedServer) -> None:
    api.api.inject(at=0, kind="status", status=503, times=10)
    client = fetcher(FetchPolicy(max_tries=3, **FAST))
    with pytest.raises(HttpStatusError) as caught:
        client.get(api.base_url + "/offsets", {"offset": "0"})
    assert caught.value.status == 503 and is_retryable(caught.value)
    assert client.requests == 3
    api.api.inject(at=0, kind="malformed", times=10)
    api.api.faults = [f for f in api.api.faults if f.kind == "malformed"]
    with pytest.raises(MalformedPage) as malformed:
        client.get(api.base_url + "/offsets", {"offset": "0"})
    assert is_retryable(malformed.value)


def test_a_client_error_is_not_retried_and_is_permanent(api: PagedServer) -> None:
    api.api.inject(at=0, kind="status", status=404, times=5)
    client = fetcher(FetchPolicy(**FAST))
    with pytest.raises(HttpStatusError) as caught:
        client.get(api.base_url + "/offsets", {"offset": "0"})
    assert caught.value.status == 404 and not is_retryable(caught.value)
    assert client.requests == 1


def test_a_long_retry_after_is_not_waited_in_the_batch(api: PagedServer) -> None:
    api.api.inject(at=0, kind="status", status=429, retry_after="3600")
    sleeps: list[float] = []
    with pytest.raises(HttpStatusError) as caught:
        fetcher(FetchPolicy(max_retry_after_s=60), sleeps).get(api.base_url + "/offsets", {"offset": "0"})
    assert caught.value.retry_after_s == 3600 and is_retryable(caught.value) and sleeps == []


def test_an_unreachable_host_is_retryable() -> None:
    from cairn_testkit.servers import free_port

    client = fetcher(FetchPolicy(max_tries=2, connect_timeout_s=1, **FAST))
    with pytest.raises(PageUnavailable) as caught:
        client.get(f"http://127.0.0.1:{free_port()}/offsets")
    assert is_retryable(caught.value) and client.requests == 2


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 1, 6, 0, 0, tzinfo=UTC)
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Tue, 01 Dec 2026 06:00:30 GMT", now=lambda: now) == 30.0
    assert retry_after_s("Tue, 01 Dec 2026 05:00:00 GMT", now=lambda: now) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_a_body_without_the_records_list_is_a_permanent_failure(api: PagedServer) -> None:
    with pytest.raises(NonRetryableError, match="records_path 'results'"):
        drain(HttpJsonPipeline, {"url": api.base_url + "/pages", "records_path": "results"})


def test_a_record_without_identity_is_refused(api: PagedServer) -> None:
    with pytest.raises(NonRetryableError, match="id_path 'uuid'"):
        drain(HttpJsonPipeline, {"url": api.base_url + "/pages", "records_path": "data.items", "id_path": "uuid"})


# --- auth from a worker secret -------------------------------------------------------------------


def test_auth_header_comes_from_a_named_worker_secret_and_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    token = "s3cret-token-value"
    with PagedServer(PagedApi(total=60, token=token)) as server:
        params = {"url": server.base_url + "/pages", "records_path": "data.items", "auth_secret": "demo_api", **FAST}
        context = RunContext(allow_private_networks=True, secrets={"demo_api": f"Bearer {token}"})
        with caplog.at_level(logging.DEBUG):
            assert len(drain(HttpJsonPipeline, params, context=context)) == 60
            with pytest.raises(HttpStatusError) as refused:  # a wrong secret: 401, permanent
                drain(HttpJsonPipeline, params, context=RunContext(allow_private_networks=True, secrets={"demo_api": "Bearer wrong"}))
        assert refused.value.status == 401 and not is_retryable(refused.value)
        with pytest.raises(MissingSecret):
            drain(HttpJsonPipeline, params)
    assert token not in caplog.text and "wrong" not in caplog.text
    assert token not in repr(context)


def test_a_secret_bound_to_hosts_goes_only_to_them_whoever_names_it() -> None:
    """CAIRN_SECRETS {"value", "hosts"}: a job aiming the secret at another host is dead-lettered
    before any request carries it (the server never sees the token)."""
    token = "bound-token-value"
    with PagedServer(PagedApi(total=60, token=token)) as server:
        params = {"url": server.base_url + "/pages", "records_path": "data.items", "auth_secret": "demo_api", **FAST}
        secrets = {"demo_api": f"Bearer {token}"}
        elsewhere = RunContext(allow_private_networks=True, secrets=secrets, secret_hosts={"demo_api": frozenset({"api.example.com"})})
        with pytest.raises(SecretNotAllowed, match="127.0.0.1") as refused:
            drain(HttpJsonPipeline, params, context=elsewhere)
        assert not is_retryable(refused.value) and token not in str(refused.value)
        assert not server.api.hits
        here = RunContext(allow_private_networks=True, secrets=secrets, secret_hosts={"demo_api": frozenset({"127.0.0.1"})})
        assert len(drain(HttpJsonPipeline, params, context=here)) == 60


def test_a_secret_bound_to_hosts_never_goes_over_plain_http_beyond_loopback() -> None:
    """Bound to `api.example.com`, a job may not send it to `http://api.example.com` (anyone on
    the path would read it); loopback (the paged test server above) is this machine."""
    params = {"url": "http://api.example.com/pages", "records_path": "data.items", "auth_secret": "demo_api", **FAST}
    bound = RunContext(allow_private_networks=True, secrets={"demo_api": "Bearer t"}, secret_hosts={"demo_api": frozenset({"api.example.com"})})
    with pytest.raises(SecretNotAllowed, match="plain http to api.example.com"):
        drain(HttpJsonPipeline, params, context=bound)


def test_a_secret_bound_to_tenants_serves_their_jobs_only() -> None:
    """CAIRN_SECRETS {"value", "hosts", "tenants"}: the workers are shared, so without it any
    tenant could name another's API credential and copy what it reads into its own namespace. A
    job of another tenant is dead-lettered before any request carries the secret."""
    settings = WorkerSettings(secrets={"acme_api": {"value": "Bearer t", "hosts": ["127.0.0.1"], "tenants": ["acme"]}})
    assert settings.secret_tenants() == {"acme_api": frozenset({"acme"})}
    token = "tenant-token-value"
    with PagedServer(PagedApi(total=60, token=token)) as server:
        params = {"url": server.base_url + "/pages", "records_path": "data.items", "auth_secret": "acme_api", **FAST}
        bound = {"secrets": {"acme_api": f"Bearer {token}"}, "secret_tenants": {"acme_api": frozenset({"acme"})}}
        other = RunContext(allow_private_networks=True, tenant="globex", **bound)
        with pytest.raises(SecretNotAllowed, match="globex") as refused:
            drain(HttpJsonPipeline, params, context=other)
        assert not is_retryable(refused.value) and token not in str(refused.value)
        assert not server.api.hits
        assert len(drain(HttpJsonPipeline, params, context=RunContext(allow_private_networks=True, tenant="acme", **bound))) == 60


def test_a_url_on_a_private_network_is_refused_unless_the_worker_allows_it(api: PagedServer) -> None:
    """The SSRF guard (cairn_runtime.egress): loopback, private and link-local hosts are
    dead-lettered before any request unless CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS is set."""
    params = {"url": api.base_url + "/pages", "records_path": "data.items", **FAST}
    with pytest.raises(RefusedUrl, match="not a public address") as refused:
        drain(HttpJsonPipeline, params, context=RunContext())
    assert not is_retryable(refused.value) and not api.api.hits
    for url in ("http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]:9/x", "http://10.0.0.1/x"):
        with pytest.raises(RefusedUrl):
            drain(HttpJsonPipeline, {**params, "url": url}, context=RunContext())
    assert len(drain(HttpJsonPipeline, params, context=RunContext(allow_private_networks=True))) == TOTAL


def test_the_guard_resolves_the_very_host_httpx_connects_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx sends `faß.de` to its IDNA 2008 name `xn--fa-hia.de`; Python's resolver, given the
    Unicode name, asks for the IDNA 2003 one, `fass.de`: a guard checking that one would pass an
    attacker's public `fass.de` and let the request reach a private `xn--fa-hia.de`."""
    answers = {"fass.de": "93.184.216.34", "xn--fa-hia.de": "127.0.0.1"}

    def resolve(host: str, *args: Any, **kwargs: Any) -> list[Any]:  # as the system resolver would answer
        ascii_host = host if host.isascii() else host.encode("idna").decode()
        return [(2, 1, 6, "", (answers[ascii_host], 0))]

    monkeypatch.setattr("socket.getaddrinfo", resolve)
    policy = FetchPolicy(max_tries=1, connect_timeout_s=1, **FAST)
    with pytest.raises(RefusedUrl, match="127.0.0.1"):
        PageFetcher(build_client(policy), policy).get("http://faß.de/pages")


@pytest.mark.parametrize("url", ["https://faß.de/v1", "https://xn--fa-hia.de/v1", "https://api.xn--fa-hia.de/v1"])
def test_a_secret_bound_to_an_idna_host_serves_it_in_either_spelling(url: str) -> None:
    """CAIRN_SECRETS hosts are ASCII (A-labels): a job's host is matched as httpx sends it, so the
    binding works whether the job spells the host in Unicode or in punycode; fass.de (the IDNA
    2003 spelling, another host) is refused."""
    bound = {"secrets": {"de_api": "Bearer t"}, "secret_hosts": {"de_api": frozenset({"xn--fa-hia.de", "*.xn--fa-hia.de"})}}
    params = HttpJsonParams(url=url, auth_secret="de_api")
    HttpJsonPipeline(params, RunContext(**bound)).close()  # raises SecretNotAllowed if not matched
    with pytest.raises(SecretNotAllowed, match="fass.de"):
        HttpJsonPipeline(HttpJsonParams(url="https://fass.de/v1", auth_secret="de_api"), RunContext(**bound))


def test_worker_secrets_are_plain_values_or_bound_to_hosts() -> None:
    settings = WorkerSettings(secrets={"open": "Bearer a", "bound": {"value": "Bearer b", "hosts": ["API.example.com", "*.example.org"]}})
    assert settings.secret_values() == {"open": "Bearer a", "bound": "Bearer b"}
    assert settings.secret_hosts() == {"bound": frozenset({"api.example.com", "*.example.org"})}
    assert "Bearer b" not in repr(settings)
    with pytest.raises(ValidationError):
        WorkerSettings(secrets={"bound": {"value": "x", "hosts": []}})
    assert host_matches("a.b.example.org", {"*.example.org"}) and not host_matches("example.org", {"*.example.org"})
    assert not host_matches("evilexample.org", {"*.example.org"}) and host_matches("API.Example.com.", {"api.example.com"})


def test_a_malformed_secrets_setting_does_not_print_the_secret() -> None:
    """The worker crashes at start on a bad CAIRN_SECRETS, and the error goes to its log: it names
    the entry and the rule, not the value (pydantic shows the input of each failed union arm)."""
    with pytest.raises(ValidationError) as refused:
        WorkerSettings(secrets={"api": {"value": "sk_live_42", "hosts": ["api.example.com:443"]}})
    assert "secrets.api" in str(refused.value) and "sk_live_42" not in str(refused.value)


def test_params_refuse_credentials_in_plain_headers_and_need_a_source() -> None:
    with pytest.raises(ValidationError, match="auth_secret"):
        HttpJsonParams(url="http://127.0.0.1/x", headers={"Authorization": "Bearer x"})
    with pytest.raises(ValidationError, match="url or urls"):
        HttpJsonParams()
    with pytest.raises(ValidationError, match="rate_limit"):
        HttpJsonParams(url="http://127.0.0.1/x", rate_limit="fast please")
    assert parse_rate(HttpJsonParams(url="http://127.0.0.1/x", rate_limit="10/second").rate_limit or "").amount == 10


# --- the per-host rate limit, shared through Redis ---------------------------------------------


def test_the_rate_limit_of_a_host_is_shared_by_every_worker(test_env: fixtures.TestEnvironment) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        rate = parse_rate("5/minute")
        # Two workers' limiters (two storages, as two processes have), one Redis.
        workers = [HostRateLimiter(redis_storage(client, test_env.redis_prefix)) for _ in range(2)]
        assert all(w.shared for w in workers)
        waited = [workers[i % 2].acquire("api.example:443", rate, max_wait_s=0.2) for i in range(5)]
        assert waited == [0.0] * 5
        for worker in workers:  # the sixth request, from either worker, finds no room this minute
            with pytest.raises(TimeoutError):
                worker.acquire("api.example:443", rate, max_wait_s=0.2)
        assert workers[1].acquire("other.example:443", rate, max_wait_s=0.2) == 0.0  # hosts are separate
        assert client.keys(f"{test_env.redis_prefix}:ratelimit*"), "the windows live under the run's prefix"
    finally:
        client.close()


def test_a_request_waits_for_room_under_the_rate(test_env: fixtures.TestEnvironment, api: PagedServer) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        context = RunContext(allow_private_networks=True, redis=client, redis_prefix=f"{test_env.redis_prefix}:wait")
        params = {"url": api.base_url + "/pages", "records_path": "data.items", "page_size": 50, "rate_limit": "2/second"}
        pipeline = HttpJsonPipeline(HttpJsonParams.model_validate(params), context)
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            time.sleep(seconds)

        assert pipeline.fetcher._limiter is not None
        pipeline.fetcher._limiter._sleep = sleep
        bounds = bounds_of(HttpJsonPipeline, params)
        batch = pipeline.read(bounds, pipeline.start(bounds), limit=1000)
        assert batch.done and len(batch.records) == TOTAL
        assert len(slept) >= 1, "5 pages at 2/second: some requests waited for room"
    finally:
        client.close()


def test_requests_go_through_unpaced_while_redis_is_away(private_redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_connect_timeout=2, socket_timeout=2)
    try:
        limiter = HostRateLimiter(redis_storage(client, "cairn-test-away"))
        rate = parse_rate("1/minute")
        assert limiter.acquire("api.example:443", rate, max_wait_s=0.1) == 0.0
        private_redis.kill()
        with caplog.at_level(logging.WARNING):
            assert [limiter.acquire("api.example:443", rate, max_wait_s=0.1) for _ in range(3)] == [0.0] * 3
        assert "without the shared limit" in caplog.text
    finally:
        client.close()


# --- raw pages in GridFS ----------------------------------------------------------------------


def test_raw_pages_are_kept_in_gridfs_once_per_content(api: PagedServer, mongo_db: Database) -> None:
    params = {"url": api.base_url + "/pages", "records_path": "data.items", "page_size": 100, "keep_raw": True}
    context = RunContext(allow_private_networks=True, store_db=mongo_db, job_id="job-raw")
    records = drain(HttpJsonPipeline, params, context=context)
    pointers = sorted({r["raw_payload_id"] for r in records})
    assert len(pointers) == 3 and mongo_db.raw_payloads.count_documents({}) == 3
    raw = RawPages(mongo_db).read(records[150]["raw_payload_id"])
    assert raw is not None and json.loads(raw)["data"]["items"][50]["id"] == records[150]["_id"]
    # The same pages again (a re-run, or a batch redone after a crash): nothing new is stored.
    assert sorted({r["raw_payload_id"] for r in drain(HttpJsonPipeline, params, context=context)}) == pointers
    assert mongo_db.raw_payloads.count_documents({}) == 3
    assert (mongo_db.raw_payloads.find_one({"_id": pointers[0]}) or {}).get("owner") == "job:job-raw"


def test_the_test_server_changes_records_deterministically(api: PagedServer) -> None:
    before = httpx.get(api.base_url + "/offsets", params={"offset": 0, "limit": 3}).json()["data"]["items"]
    api.api.change([1])
    after = httpx.get(api.base_url + "/offsets", params={"offset": 0, "limit": 3}).json()["data"]["items"]
    assert before[0] == after[0] and before[2] == after[2]
    assert after[1]["version"] == 2 and after[1]["name"] != before[1]["name"]


def test_the_announced_schema_carries_the_rules_the_gateway_checks() -> None:
    from jsonschema import Draft202012Validator

    schema = HttpJsonPipeline.catalog_entry()["params_schema"]
    validator = Draft202012Validator(schema)

    def refused(params: dict[str, Any]) -> bool:
        return any(True for _ in validator.iter_errors(params))

    assert not refused({"url": "https://api.example/v1/items", "headers": {"Accept": "application/json"}})
    assert refused({"url": "https://api.example/v1/items", "headers": {"authorization": "Bearer x"}})
    assert refused({"url": "https://api.example/v1/items", "headers": {"X-Api-Key": "x"}})
    assert refused({"paging": "page"})  # neither url nor urls
    assert refused({"url": "https://api.example/v1/items", "paging": "link", "start": 1, "end": 5})
    assert not refused({"urls": ["https://api.example/v1/a"], "paging": "link"})
    assert refused({"url": "ftp://api.example/items"})


def test_a_cursor_that_never_moves_fails_instead_of_looping(api: PagedServer) -> None:
    # A misread next token: `meta.page` is the page just served, so the "next" token repeats.
    params = {"url": api.base_url + "/pages", "paging": "cursor", "cursor_param": "page", "next_cursor_path": "meta.page",
              "records_path": "data.items"}
    with pytest.raises(NonRetryableError, match="never end"):
        drain(HttpJsonPipeline, params, limit=10)
    assert api.api.hits[("/pages", 0)] == 2  # the first page, then once more: no loop


def test_a_batch_stops_at_its_page_budget_and_resumes(api: PagedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn_ingest_worker.pipelines import http_json

    monkeypatch.setattr(http_json, "MAX_PAGES_PER_BATCH", 3)
    params = HttpJsonParams(url=api.base_url + "/offsets", paging="offset", records_path="data.items", page_size=10)
    pipeline = HttpJsonPipeline(params, RunContext(allow_private_networks=True))
    bounds = Bounds(0, 1)
    batch = pipeline.read(bounds, pipeline.start(bounds), limit=1000)
    assert len(batch.records) == 30 and not batch.done and batch.cursor == {"item": 0, "next": 30}
    assert ids(drain(HttpJsonPipeline, params.model_dump(), limit=1000)) == EVERY_ID


# --- a secret goes only to the hosts the job names ---------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """A host the job does not name: records the headers it is sent; serves an empty last page,
    or from the API's side (`/api/...`) a Link or a redirect to `other` (set by the test)."""

    seen: ClassVar[list[dict[str, str]]] = []
    other: ClassVar[str] = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.startswith("/api/redirect"):
            self.send_response(302)
            self.send_header("Location", self.other + "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {}
        if self.path.startswith("/api/link"):
            body = {"data": [{"id": "a"}]}
            headers["Link"] = f'<{self.other}/elsewhere>; rel="next"'
        else:
            type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
            body = {"data": []}
        data = json.dumps(body).encode()
        self.send_response(200)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("paging,path", [("link", "/api/link"), ("page", "/api/redirect")])
@pytest.mark.parametrize("auth_header", ["Authorization", "X-Api-Key"])
def test_the_secret_is_never_sent_to_a_host_a_link_or_redirect_points_at(paging: str, path: str, auth_header: str) -> None:
    api, other = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder), ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    for server in (api, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen, _Recorder.other = [], f"http://127.0.0.1:{other.server_address[1]}"
    try:
        params = {"url": f"http://127.0.0.1:{api.server_address[1]}{path}", "paging": paging, "auth_secret": "demo", "auth_header": auth_header}
        drain(HttpJsonPipeline, {**params, **FAST}, context=RunContext(allow_private_networks=True, secrets={"demo": "s3cret"}))
    finally:
        api.shutdown(), other.shutdown()
    assert _Recorder.seen, "the other host was reached"
    assert all(auth_header.lower() not in headers for headers in _Recorder.seen)


def test_start_urls_must_be_http_urls() -> None:
    with pytest.raises(ValidationError, match="urls.1"):
        HttpJsonParams(urls=["http://127.0.0.1/a", "file:///etc/passwd"])
