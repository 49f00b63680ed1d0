"""Error answers: the one place that turns an error into an HTTP answer, and its one body shape.

Every answer other than a success is a Problem (RFC 9457, `application/problem+json`):

    {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no job 42",
     "loc": ["path", "job_id"]}

- `title` is the status' reason phrase, `status` its code, `type` always `about:blank`;
- `detail` says what is wrong, in words; for 422 it is instead the list of field errors
  `[{"loc": [...], "msg": str, "type": str, "input"?: ...}]`, as FastAPI's request validation
  errors always had it (what clients read; RFC 9457 allows the extension);
- `loc`, when there is one, is the request part at fault, as in validation errors
  (`["header", "Authorization"]`, `["path", "job_id"]`, `["body"]`).

The services raise domain errors only (errors.py); `install_problem_handlers` maps each kind to
its status here, and the request validation errors, Starlette's HTTP errors (unknown route, wrong
method) and MongoDB outages (503) to the same body. The OpenAPI document describes each answer.
"""

import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cairn_contracts.bounds import has_surrogate
from cairn_contracts.jobs import SHARDING_STRATEGIES
from cairn_gateway.degraded import warn_sparingly
from cairn_gateway.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Gone,
    Invalid,
    NotConfirmed,
    NotFound,
    RateLimited,
    Unauthorized,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
STORE_RETRY_AFTER_S = 5  # a store that does not answer is usually restarting or failing over

# The status of each kind of domain error (errors.py); the first base class that matches wins.
STATUS_OF: tuple[tuple[type[DomainError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (Gone, 410),
    (Invalid, 422),
    (NotConfirmed, 503),
    (Unauthorized, 401),
    (Forbidden, 403),
    (RateLimited, 429),
)


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the value is: [\"body\", \"params\", \"count\"], [\"query\", \"cursor\"]")
    msg: str
    type: str


class Problem(BaseModel):
    """What went wrong (RFC 9457 problem details), and the request part at fault."""

    type: str = Field("about:blank", description="Always about:blank: `status` and `title` say it all")
    title: str = Field(description="The status' reason phrase, e.g. Not Found")
    status: int
    detail: str | list[FieldError] = Field(description="What is wrong; for 422, the list of field errors")
    loc: list[str | int] | None = Field(None, description="The request part at fault, e.g. [\"header\", \"Authorization\"]")


def problem_body(status: int, detail: str | list[Any], loc: list[str | int] | None = None) -> dict[str, Any]:
    """The one error body: `Problem` as JSON (`loc` left out when there is none)."""
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    if loc is not None:
        body["loc"] = loc
    return body


def problem(
    status: int, detail: str | list[Any], loc: list[str | int] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error answer: `problem_body` as `application/problem+json`."""
    return JSONResponse(status_code=status, content=problem_body(status, detail, loc), media_type=PROBLEM_MEDIA_TYPE, headers=headers)


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No API key, or one that is unknown or revoked (`Authorization: Bearer cairn_…`)"},
    403: {"model": Problem, "description": "The API key lacks the scope this call needs (submit, read or admin)"},
    413: {"model": Problem, "description": "The request body is larger than CAIRN_MAX_BODY_BYTES"},
    429: {
        "model": Problem,
        "description": "The API key's rate limit is reached",
        "headers": {"Retry-After": {"description": "Seconds until the next request is accepted", "schema": {"type": "integer"}}},
    },
}

UNAVAILABLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "The job store (MongoDB) does not answer; nothing was changed, retry later",
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
    },
}


def status_of(error: DomainError) -> int:
    for kind, status in STATUS_OF:
        if isinstance(error, kind):
            return status
    return 500  # a DomainError of no known kind is a bug of the gateway


def loc_of(request: Request, error: DomainError) -> list[str | int] | None:
    """The request part an error is about: what its kind says (`at`), else the path parameter
    holding the id it names (`["path", "job_id"]` on /v1/jobs, `["path", "task_id"]` on /task)."""
    if error.at is not None:
        return list(error.at)
    if error.ident is not None:
        for name, value in request.path_params.items():
            if value == error.ident:
                return ["path", name]
    return None


def _headers_of(error: DomainError) -> dict[str, str] | None:
    if isinstance(error, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(error, RateLimited):
        return {"Retry-After": str(error.retry_after_s)}
    return None


def _field_errors(errors: Any) -> Any:
    """Field errors as JSON that strict UTF-8 JSON can hold, located at the fields themselves."""
    return jsonable_encoder(json_safe([_field_located(e) for e in errors]))


def _field_located(error: dict[str, Any]) -> dict[str, Any]:
    """Point errors of the sharding union at the field itself.

    pydantic reports an unknown tag at the union itself and puts the chosen member's tag into
    the location of its fields' errors; clients want `body.sharding.strategy` and
    `body.sharding.shards`.
    """
    raw = list(error.get("loc", ()))
    loc = [part for before, part in zip([None, *raw], raw, strict=False) if not _is_union_tag(before, part)]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        # A callable discriminator reports itself as "name()"; ours are named after the field.
        discriminator = str(error.get("ctx", {}).get("discriminator", "")).strip("'").removesuffix("()")
        if discriminator and discriminator.isidentifier() and (not loc or loc[-1] != discriminator):
            loc.append(discriminator)
    return {**error, "loc": loc}


def _is_union_tag(parent: object, part: object) -> bool:
    return parent == "sharding" and part in SHARDING_STRATEGIES


def json_safe(value: Any) -> Any:
    """`value` (already JSON-shaped) with what strict JSON in UTF-8 cannot hold made printable.

    A validation error echoes the client's input: a lone surrogate (`"\\ud800"`) cannot be
    encoded as UTF-8 and NaN/Infinity are not JSON, so echoed as they are the 422 itself would
    fail (a 500). Such a string shows its surrogates as `\\udXXX` escapes, such a number as the
    text `NaN`, `Infinity` or `-Infinity`.
    """
    return _json_safe(value, ECHO_DEPTH)


# How deep an echoed input is shown; deeper parts are replaced by a marker. Bounded so a hostile
# body nested thousands of levels deep cannot exhaust the stack while its 422 is built.
ECHO_DEPTH = 32
_TOO_DEEP = "…(nested too deep to echo)"


def _json_safe(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogate(value) else value
    if isinstance(value, (bytes, bytearray)):  # a body that is not JSON text (e.g. invalid UTF-8)
        return bytes(value[:1000]).decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (dict, list, tuple)) and depth <= 0:
        return _TOO_DEEP
    if isinstance(value, dict):
        return {_json_safe(key, depth - 1): _json_safe(item, depth - 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, depth - 1) for item in value]
    return value


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with every error answer (4xx, 5xx) served as `application/problem+json`
    (what the handlers send), and 422 described by `Problem` (FastAPI documents its own
    `HTTPValidationError` there, the `detail` list alone)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, answer in operation.get("responses", {}).items():
                content = answer.get("content")
                if not (code.isdigit() and int(code) >= 400 and content and "application/json" in content):
                    continue
                body = content.pop("application/json")
                content[PROBLEM_MEDIA_TYPE] = {"schema": {"$ref": "#/components/schemas/Problem"}} if code == "422" else body
    return schema


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error raised below a route with a Problem (see the module's docstring), and say
    so in the OpenAPI document."""
    openapi = app.openapi

    def problem_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(openapi())
        return app.openapi_schema

    app.openapi = problem_openapi  # type: ignore[method-assign]

    @app.exception_handler(DomainError)
    async def _domain(request: Request, error: DomainError) -> JSONResponse:
        if isinstance(error, Invalid):
            return problem(422, _field_errors(error.errors))
        return problem(status_of(error), str(error), loc_of(request, error), _headers_of(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, _field_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own answers: no such route (404), method not allowed (405).
        return problem(exc.status_code, str(exc.detail), headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(ConnectionFailure)
    @app.exception_handler(ExecutionTimeout)
    async def _store_unavailable(_: Request, error: PyMongoError) -> JSONResponse:
        """MongoDB unreachable or stalled (no server within CAIRN_MONGODB_SERVER_SELECTION_TIMEOUT_MS,
        a dropped connection, an operation past CAIRN_MONGODB_OPERATION_TIMEOUT_MS: pymongo's
        ConnectionFailure and its subclasses AutoReconnect, NetworkTimeout,
        ServerSelectionTimeoutError, and ExecutionTimeout) → 503 naming the store. A write that
        timed out may still have been applied: clients retry with the same Idempotency-Key."""
        warn_sparingly(
            ("mongodb", "request"), "MongoDB did not answer (%s: %s); answering 503", type(error).__name__, str(error)[:300]
        )
        return problem(
            503,
            f"the job store (MongoDB) is unavailable; retry in {STORE_RETRY_AFTER_S} s",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )
