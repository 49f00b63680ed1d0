"""Hostile values in every body field, query, path and header parameter of every route: no 5xx.

The routes and their parameters come from the app's own OpenAPI document, so a new route or field
is fuzzed without touching this test. hypothesis picks, per operation, which parameter (or body
field, at any depth, through the job spec's unions) gets which hostile value: strings with lone
surrogates, NUL, invalid UTF-8 or 100k characters; NaN and ±Infinity as raw JSON tokens; 2^63,
2^64, ±10^30; moments at and past the ends of the calendar. The rest of the request is valid, so
the value reaches as deep as the gateway lets it: validation, MongoDB, Redis, the broker. The app
runs with its lifespan against this run's MongoDB-wire server, RabbitMQ vhost and Redis prefix
(issue 11, acceptance).
"""

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn_contracts.states import DeadLetterStatus
from cairn_contracts.store import API_KEYS, TASK_ERRORS
from cairn_gateway.auth import new_key
from cairn_gateway.console.routes import router as console_router

EXAMPLES_PER_OPERATION = 30
MARK = "__hostile__"

# Raw JSON tokens: what a hostile client can put where a JSON value goes.
HOSTILE_TEXT = ["a\ud800", "\udfff", "\ud83d", "x\udc00y", "\x00", "a\x00b", "x" * 100_000, "", " ", "\u202e\ufeff"]
HOSTILE_JSON = (
    [json.dumps(text) for text in HOSTILE_TEXT]
    + ["NaN", "Infinity", "-Infinity", str(2**63), str(2**64), str(10**30), str(-(10**30)), "1e309", "-0", "0.5", "-1"]
    + [json.dumps(moment) for moment in ("0001-01-01T00:00:00", "9999-12-31T23:59:59", "10000-01-01T00:00:00",
                                         "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00", "1969-12-31T23:59:59.999Z")]
    + ["true", "null", "[]", "{}", '["\\ud800"]', '{"\\ud800": 1}']
)
# Percent-encoded query and path values (a URL cannot carry a lone surrogate; its bytes can).
HOSTILE_URL = [
    "%ED%A0%80", "a%00b", "%00", "%FF%FE", "x" * 5_000, "NaN", "Infinity", "-Infinity", str(2**63), str(2**64),
    str(10**30), str(-(10**30)), "0001-01-01T00:00:00", "9999-12-31T23:59:59", "10000-01-01T00:00:00",
    "0001-01-01T00:00:00%2B01:00", "9999-12-31T23:59:59-14:00", "", "%2F..%2F", "%5B%5D",
]
HOSTILE_HEADER = ["x" * 8_000, b"\xff\xfe", b"\xed\xa0\x80", " ", "NaN", str(2**64), "a\tb"]  # bytes: sent as they are

SYNTHETIC = {"pipeline": "synthetic", "params": {"count": 10}, "sharding": {"strategy": "range", "shards": 2}}
MONGO_RANGE = {"pipeline": "mongo_range", "params": {"collection": "src", "start": 0, "end": 10}}
# A valid subtree for each tag of a tagged union: the hostile field is set inside a valid variant.
VARIANTS: dict[str, Any] = {
    "synthetic": SYNTHETIC,
    "mongo_range": MONGO_RANGE,
    "range": {"strategy": "range", "shards": 2},
    "hash_mod": {"strategy": "hash_mod", "shards": 2},
    "lease_frontier": {"strategy": "lease_frontier", "shards": 2, "item_size": 5},
}
BODIES: dict[tuple[str, str], Any] = {
    ("post", "/task/start"): SYNTHETIC,
    ("post", "/v1/jobs"): SYNTHETIC,
    ("post", "/v1/schedules"): {"kind": "interval", "interval_s": 3600, "job": SYNTHETIC},
    ("patch", "/v1/schedules/{schedule_id}"): {"name": "renamed"},
    ("put", "/v1/schedules/{schedule_id}"): {"kind": "interval", "interval_s": 600, "overlap": "buffer_one", "job": SYNTHETIC},
    ("post", "/v1/schedules/batch-delete"): {"ids": ["no-such-schedule"]},
    ("post", "/v1/results/batch-delete"): {"ids": ["no-such-job"], "scope": "result"},
    ("post", "/v1/keys"): {"scopes": ["read"], "name": "fuzz"},
    ("post", "/dlq/entries/{entry_id}/replay"): {"note": "fuzz"},
    ("post", "/dlq/entries/{entry_id}/discard"): {"note": "fuzz"},
    ("post", "/dlq/replay"): {"job_id": "job-fuzz"},
}
GATEWAY_SETTINGS = {"rate_limit_per_minute": 0}  # conftest.py `settings`: hundreds of requests a second


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def fields(spec: dict[str, Any], schema: dict[str, Any], path: tuple = (), variant: tuple = (), seen: frozenset = frozenset()) -> list:
    """Every field (path) of a body schema, with the union variants (prefix, tag) on the way."""
    schema = resolve(spec, schema)
    key = json.dumps(schema, sort_keys=True)
    if key in seen:
        return []
    seen = seen | {key}
    found: list = []
    members = schema.get("oneOf") or schema.get("anyOf")
    if members:
        for member in members:
            member_schema = resolve(spec, member)
            tags = [p["const"] for p in member_schema.get("properties", {}).values() if isinstance(p, dict) and p.get("const") in VARIANTS]
            found += fields(spec, member, path, variant + ((path, tags[0]),) if tags else variant, seen)
        return found
    if schema.get("type") == "array" and "items" in schema:
        return [(path, variant)] + fields(spec, schema["items"], (*path, 0), variant, seen)
    properties = schema.get("properties") or {}
    for name, child in properties.items():
        found.append(((*path, name), variant))
        found += fields(spec, child, (*path, name), variant, seen)
    return found


def hostile_body(base: Any, path: tuple, variant: tuple, token: str) -> str:
    """`base` with each union variant on `path`'s way chosen, and `token` (raw JSON) at `path`."""
    body = copy.deepcopy(base)
    for prefix, tag in variant:
        if not prefix:
            body = copy.deepcopy(VARIANTS[tag])
        else:
            holder = body
            for part in prefix[:-1]:
                holder = holder.setdefault(part, {}) if isinstance(holder, dict) else holder
            if isinstance(holder, dict):
                holder[prefix[-1]] = copy.deepcopy(VARIANTS[tag])
    holder = body
    for part in path[:-1]:
        if isinstance(holder, dict):
            holder = holder.setdefault(part, {} if not isinstance(part, int) else [])
        elif isinstance(holder, list):
            holder = holder[0] if holder else holder
    if isinstance(holder, dict):
        holder[path[-1]] = MARK
    elif isinstance(holder, list):
        holder[:] = [MARK]
    return json.dumps(body).replace(json.dumps(MARK), token)


def operations(app: FastAPI) -> list[tuple[str, str, dict[str, Any]]]:
    """Every operation, deletes last (so the resources named in paths exist for the others)."""
    found = [(method, path, op) for path, ops in app.openapi()["paths"].items() for method, op in ops.items()]
    return sorted(found, key=lambda operation: operation[0] == "delete")


def console_operations() -> list[tuple[str, str, dict[str, Any]]]:
    """The console's routes (left out of the OpenAPI document) as operations of the same shape:
    path and query parameters from each route's own declaration; its form fields (the job spec
    the console posts on) as a form body holding a job spec, so a new console route is fuzzed
    too. Each form field is a spec whose JobSpec fields get the hostile JSON values."""
    found = []
    for route in console_router.routes:
        if not isinstance(route, APIRoute):
            continue
        dependant = route.dependant
        parameters = [{"in": "path", "name": p.alias} for p in dependant.path_params]
        parameters += [{"in": "query", "name": p.alias} for p in dependant.query_params]
        for method in sorted(route.methods):
            found.append((method.lower(), route.path, {"parameters": parameters, "form": [p.alias for p in dependant.body_params]}))
    return found


def cases_for(spec: dict[str, Any], method: str, path: str, op: dict[str, Any]) -> list[dict[str, Any]]:
    """hypothesis' choice of hostile requests for one operation (generated first, sent after: the
    app runs in pytest's event loop, hypothesis' test function is synchronous)."""
    parameters = [p for p in op.get("parameters", []) if p["in"] in ("query", "path", "header")]
    body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    targets: list[tuple] = [("param", p["in"], p["name"]) for p in parameters]
    for name in op.get("form", []):  # a console form field holding a job spec (JSON text)
        job_schema = {"$ref": "#/components/schemas/JobSpec"}
        targets += [("form", name, field_path, variant) for field_path, variant in fields(spec, job_schema) if field_path]
        targets.append(("form", name, (), ()))
    if body_schema is not None:
        targets += [("body", field_path, variant) for field_path, variant in fields(spec, body_schema) if field_path]
        targets.append(("body", (), ()))  # the whole body is hostile
    if not targets:
        return []
    drawn: list[dict[str, Any]] = []

    @given(target=st.sampled_from(targets), data=st.data())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def draw(target: tuple, data: st.DataObject) -> None:
        case: dict[str, Any] = {"method": method, "path": path, "target": target}
        if target[0] == "param":
            where = target[1]
            pool = HOSTILE_HEADER if where == "header" else HOSTILE_URL
            case["param"] = (where, target[2], data.draw(st.sampled_from(pool)))
        elif target[0] == "form":
            token = data.draw(st.sampled_from(HOSTILE_JSON))
            text = token if not target[2] else hostile_body(SYNTHETIC, target[2], target[3], token)
            case["form"] = (target[1], text)
        else:
            token = data.draw(st.sampled_from(HOSTILE_JSON))
            base = BODIES.get((method, path), {})
            case["body"] = token if not target[1] else hostile_body(base, target[1], target[2], token)
        drawn.append(case)

    draw()
    return drawn


async def send(client: httpx.AsyncClient, case: dict[str, Any], ids: dict[str, str]) -> httpx.Response:
    path: str = case["path"]
    query: list[str] = []
    headers: dict[str, str] = {}
    hostile_param = case.get("param")
    for name, value in ids.items():
        if hostile_param is None or hostile_param[:2] != ("path", name):
            path = path.replace("{" + name + "}", quote(value, safe=""))
    if hostile_param is not None:
        where, name, value = hostile_param
        if where == "path":
            path = path.replace("{" + name + "}", value or "%20")
        elif where == "query":
            query.append(f"{quote(name)}={value}")
        else:
            headers[name] = value
    if "form" in case:  # the text as UTF-8 bytes, percent-encoded (lone surrogates too)
        name, text = case["form"]
        url = path + ("?" + "&".join(query) if query else "")
        form = f"{quote(name)}={quote(text.encode('utf-8', 'surrogatepass'), safe='')}".encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return await client.request(case["method"].upper(), url, content=form, headers=headers)
    body = case.get("body")
    if body is None and (case["method"], case["path"]) in BODIES:
        body = json.dumps(BODIES[(case["method"], case["path"])])
    url = path + ("?" + "&".join(query) if query else "")
    content = body.encode("utf-8", "surrogatepass") if body is not None else None  # raw JSON escapes are ASCII anyway
    if content is not None:
        headers["Content-Type"] = "application/json"
    return await client.request(case["method"].upper(), url, content=content, headers=headers)


async def test_hostile_values_in_every_parameter_of_every_route_answer_no_5xx(app, db, test_env) -> None:
    document, token = new_key("default", ["admin"], "fuzz")
    db[API_KEYS].insert_one(document)
    spare, _ = new_key("default", ["read"], "fuzz-spare")  # the one DELETE /v1/keys/{key_id} revokes
    db[API_KEYS].insert_one(spare)
    entry_id = f"dl-{uuid.uuid4().hex[:8]}"
    db[TASK_ERRORS].insert_one(
        {"_id": entry_id, "kind": "service", "status": DeadLetterStatus.OPEN, "reason": "retries_exhausted", "job_id": "job-fuzz",
         "shard_key": "job-fuzz:0000", "tenant": "default", "attempts": 1, "created_at": datetime.now(UTC), "replays": []}
    )
    async with httpx.AsyncClient(
        # A server error is answered as a 500 (as uvicorn would), so one run reports every one of them.
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ) as client:
        created = await client.post("/v1/schedules", json=BODIES[("post", "/v1/schedules")])
        job = await client.post("/v1/jobs", json={**SYNTHETIC, "name": "fuzz-target"})
        assert created.status_code == 201 and job.status_code == 202, (created.text, job.text)
        ids = {
            "task_id": job.json()["id"], "job_id": job.json()["id"], "schedule_id": created.json()["id"],
            "entry_id": entry_id, "key_id": spare["_id"], "command_id": "no-such-command",
        }
        spec = app.openapi()
        ops = operations(app)
        assert len(ops) >= 25
        console = console_operations()
        assert len(console) >= 15
        ops += console
        server_errors: list[str] = []
        sent = 0
        for method, path, op in ops:
            for case in cases_for(spec, method, path, op):
                response = await send(client, case, ids)
                sent += 1
                if response.status_code >= 500:
                    server_errors.append(f"{case} -> {response.status_code} {response.text[:300]}")
                else:
                    response.content.decode("utf-8")  # every answer is valid UTF-8
                    if response.headers.get("content-type", "").startswith(("application/json", "application/problem+json")):
                        json.loads(response.content)
    assert sent >= 300
    assert not server_errors, f"{len(server_errors)} of {sent} answered 5xx:\n" + "\n".join(server_errors[:15])
