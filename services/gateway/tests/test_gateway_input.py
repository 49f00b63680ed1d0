"""Hostile input at the gateway: a clear 422 naming the field, never a 500, nothing recorded
(issue 11 items 6, 7), and the API's truths (items 14, 15). Driven through ASGI with the app's
lifespan against this run's MongoDB-wire server, RabbitMQ vhost and Redis prefix."""

import base64
import json
import uuid

import httpx
import pytest

from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS, SCHEDULES

GATEWAY_SETTINGS = {"job_lock_ttl_s": 0}  # conftest.py `settings`: one spec is submitted many times


@pytest.fixture
def client(client_for) -> httpx.AsyncClient:
    return client_for()


def raw(text: str) -> dict:
    """A request body sent as this exact JSON text (surrogate escapes and NaN tokens included)."""
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def locs(response: httpx.Response) -> list[list]:
    return [error["loc"] for error in response.json()["detail"]]


JOB = '{"pipeline": "synthetic", "params": {"count": 10%s}%s}'
SCHEDULE = '{"kind": "interval", "interval_s": 60, "job": {"pipeline": "synthetic", "params": {"count": 1}}%s}'

# (method, path, raw body, the field the 422 must name)
HOSTILE_BODIES = [
    ("POST", "/v1/jobs", JOB % ("", ', "name": "a\\ud800"'), ["body", "name"]),
    ("POST", "/task/start", JOB % ("", ', "name": "\\udfff tail"'), ["body", "name"]),
    ("POST", "/v1/jobs", JOB % (', "delay_ms_per_record": NaN', ""), ["body", "params", "delay_ms_per_record"]),
    ("POST", "/v1/jobs", JOB % (', "delay_ms_per_record": Infinity', ""), ["body", "params", "delay_ms_per_record"]),
    ("POST", "/v1/jobs", JOB % ("", ', "retry": {"base_delay_s": -Infinity}'), ["body", "retry", "base_delay_s"]),
    ("POST", "/v1/jobs", '{"pipeline": "synthetic", "params": {"count": NaN}}', ["body", "params", "count"]),
    (
        "POST",
        "/v1/jobs",
        '{"pipeline": "mongo_range", "params": {"collection": "src", "start": 0, "end": 5, "fields": ["ok", "x\\ud800"]}}',
        ["body", "params", "fields", 1],
    ),
    ("POST", "/v1/schedules", SCHEDULE % ', "name": "a\\ud800"', ["body", "name"]),
    ("POST", "/v1/schedules", '{"kind": "cron", "cron": "* * * * *", "timezone": "\\ud800", "job": {"pipeline": "synthetic", "params": {"count": 1}}}', ["body", "timezone"]),
    ("POST", "/dlq/replay", '{"job_id": "a\\ud800"}', ["body", "job_id"]),
    ("POST", "/dlq/replay", '{"job_id": "j", "limit": NaN}', ["body", "limit"]),
    ("POST", "/v1/keys", '{"scopes": ["read"], "name": "\\ud800"}', ["body", "name"]),
]


@pytest.mark.parametrize("method, path, body, field", HOSTILE_BODIES, ids=[f"{m} {p} {f[-1]}" for m, p, _, f in HOSTILE_BODIES])
async def test_a_lone_surrogate_or_a_non_finite_number_is_a_422_naming_the_field(client, db, method, path, body, field) -> None:
    before = (db[JOBS].count_documents({}), db[SCHEDULES].count_documents({}))

    response = await client.request(method, path, **raw(body))

    assert response.status_code == 422, response.text
    assert field in locs(response)
    assert (db[JOBS].count_documents({}), db[SCHEDULES].count_documents({})) == before


async def test_the_422_echoing_hostile_input_is_valid_json(client) -> None:
    # Another field is at fault; the surrogate and the NaN are only echoed back.
    body = '{"pipeline": "synthetic\\ud800", "params": {"count": NaN, "key_prefix": "\\ud83d"}, "name": "\\udc00"}'

    response = await client.post("/v1/jobs", **raw(body))

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"  # the one error body (problems.py)
    json.loads(response.content.decode("utf-8"))  # strict UTF-8 and plain JSON


async def test_json_nested_thousands_deep_is_a_4xx_not_a_500(client, db) -> None:
    # Echoing the input of such a body once exhausted the stack (a plain-text 500).
    before = db[JOBS].count_documents({})
    for depth in (600, 3000):
        body = '{"name": ' + "[" * depth + "1" + "]" * depth + ', "pipeline": "synthetic", "params": {"count": 1}}'
        response = await client.post("/v1/jobs", **raw(body))
        assert 400 <= response.status_code < 500, (depth, response.status_code, response.text[:200])
        json.loads(response.content)
    assert db[JOBS].count_documents({}) == before


async def test_bytes_that_are_not_utf8_under_another_content_type_are_a_4xx(client) -> None:
    for path in ("/v1/jobs", "/task/start", "/dlq/replay"):
        response = await client.post(path, content=b"\xff\xfe", headers={"Content-Type": "text/plain"})
        assert response.status_code == 422, (path, response.status_code, response.text[:200])
        json.loads(response.content)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"pipeline": "synthetic", "params": {"count": 1}, "target_collection": "shards"}, ["body", "target_collection"]),
        ({"pipeline": "synthetic", "params": {"count": 1}, "target_collection": "api_keys"}, ["body", "target_collection"]),
        ({"pipeline": "mongo_range", "params": {"collection": "api_keys", "start": 0, "end": 9}}, ["body", "params", "collection"]),
        ({"pipeline": "mongo_range", "params": {"collection": "jobs", "start": 0, "end": 9}}, ["body", "params", "collection"]),
        ({"pipeline": "mongo_range", "params": {"collection": "src", "start": 0, "end": 9, "fields": ["$where"]}}, ["body", "params", "fields", 0]),
    ],
)
async def test_cairns_own_collections_are_neither_target_nor_source(client, db, body, field) -> None:
    before = db[JOBS].count_documents({})

    response = await client.post("/v1/jobs", json=body)

    assert response.status_code == 422, response.text
    assert field in locs(response)
    assert db[JOBS].count_documents({}) == before


async def test_a_schedule_patch_with_hostile_values_is_a_422(client) -> None:
    created = await client.post("/v1/schedules", json={"kind": "interval", "interval_s": 60, "job": {"pipeline": "synthetic", "params": {"count": 1}}})
    assert created.status_code == 201, created.text
    url = created.json()["url"]

    for body, field in [
        ('{"name": "x\\ud800"}', ["body", "name"]),
        ('{"interval_s": 100000000000000000000000000000}', ["body", "interval_s"]),
        ('{"start_at": "9999-12-31T23:59:59"}', ["body", "start_at"]),
        ('{"max_runs": 9223372036854775808}', ["body", "max_runs"]),
    ]:
        response = await client.patch(url, **raw(body))
        assert response.status_code == 422, (body, response.text)
        assert field in locs(response), response.text


def cursor_of(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/schedules"])
@pytest.mark.parametrize(
    "cursor",
    [cursor_of([10**30, "x"]), cursor_of([-(2**64), "x"]), cursor_of([1, "\ud800"]), cursor_of([True, "x"]), cursor_of([1, "x" * 1000])],
    ids=["10^30", "-2^64", "surrogate-id", "bool", "long-id"],
)
async def test_a_hand_made_cursor_is_a_422_naming_the_cursor(client, path, cursor) -> None:
    response = await client.get(path, params={"cursor": cursor})

    assert response.status_code == 422, response.text
    assert ["query", "cursor"] in locs(response)


@pytest.mark.parametrize(
    "path, params, field",
    [
        ("/dlq/entries", {"offset": str(2**63)}, "offset"),
        ("/dlq/entries", {"offset": str(10**30)}, "offset"),
        ("/dlq/entries", {"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ("/dlq/entries", {"until": "9999-12-31T23:59:59-14:00"}, "until"),
        ("/v1/jobs", {"created_after": "0001-01-01T00:00:00+01:00"}, "created_after"),
        ("/v1/jobs", {"created_before": "9999-12-31T23:59:59-14:00"}, "created_before"),
        ("/v1/jobs", {"q": "a\x00b"}, "q"),
    ],
)
async def test_query_values_out_of_range_are_a_422_naming_them(client, path, params, field) -> None:
    response = await client.get(path, params=params)

    assert response.status_code == 422, response.text
    assert ["query", field] in locs(response)


@pytest.mark.parametrize(
    "timing, field",
    [
        ({"kind": "interval", "interval_s": 60, "start_at": "9999-12-31T00:00:00"}, "start_at"),
        ({"kind": "once", "at": "9999-12-31T23:59:59"}, "at"),
        ({"kind": "cron", "cron": "0 0 29 2 *", "start_at": "9999-03-01T00:00:00"}, "start_at"),
        ({"kind": "interval", "interval_s": 60, "end_at": "0001-01-01T00:00:00+01:00"}, "end_at"),
    ],
)
async def test_a_schedule_moment_beyond_what_can_be_computed_is_a_422(client, db, timing, field) -> None:
    before = db[SCHEDULES].count_documents({})

    response = await client.post("/v1/schedules", json={**timing, "job": {"pipeline": "synthetic", "params": {"count": 1}}})

    assert response.status_code == 422, response.text
    assert ["body", field] in locs(response)
    assert db[SCHEDULES].count_documents({}) == before


async def test_a_far_but_computable_schedule_is_accepted(client) -> None:
    response = await client.post(
        "/v1/schedules",
        json={"kind": "cron", "cron": "0 0 29 2 *", "start_at": "8999-03-01T00:00:00", "job": {"pipeline": "synthetic", "params": {"count": 1}}},
    )

    assert response.status_code == 201, response.text
    assert response.json()["next_run_at"].startswith("9000-02-29") or response.json()["next_run_at"].startswith("9004-02-29")


async def test_cancel_of_a_cancelled_job_is_409(client, db) -> None:
    created = await client.post("/v1/jobs", json={"pipeline": "synthetic", "params": {"count": 5}, "name": f"c-{uuid.uuid4().hex[:6]}"})
    job_id = created.json()["id"]
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202  # still CANCELLING: asked again
    db[JOBS].update_one({"_id": job_id}, {"$set": {"state": str(JobState.CANCELLED)}})  # what the scheduler ends it in

    response = await client.post(f"/v1/jobs/{job_id}/cancel")

    assert response.status_code == 409, response.text
    assert "CANCELLED" in response.json()["detail"] and response.json()["loc"] == ["path", "job_id"]


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
async def test_metrics_are_served_at_the_path_itself(client, path) -> None:
    await client.get("/v1/jobs/counts")  # at least one request counted

    response = await client.get(path)  # httpx follows no redirect unless asked

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "cairn_http_requests_total" in response.text
