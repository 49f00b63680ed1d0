"""Error answers: every 4xx names what is wrong and, where there is one, the
field at fault (`loc`, as in validation errors: `["header", "Authorization"]`, `["path",
"job_id"]`, `["body", "cron"]`). The OpenAPI document describes each of them."""

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pymongo.errors import ConnectionFailure

from cairn_contracts.bounds import has_surrogate
from cairn_contracts.jobs import SHARDING_STRATEGIES
from cairn_contracts.pipelines import PIPELINE_NAMES
from cairn_gateway.degraded import warn_sparingly
from cairn_gateway.joblock import DuplicateJob
from cairn_gateway.jobs import IdempotencyConflict, JobNotFound, JobStillRunning, ResultExpired


class ApiError(Exception):
    """An answer other than success, raised anywhere below a route."""

    def __init__(
        self, status: int, detail: str, loc: list[str | int] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.loc = loc
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        if self.status == 422:  # the same shape as request validation errors
            return {"detail": [{"loc": self.loc or ["body"], "msg": self.detail, "type": "value_error"}]}
        body: dict[str, Any] = {"detail": self.detail}
        if self.loc is not None:
            body["loc"] = self.loc
        return body


class Problem(BaseModel):
    """What went wrong, and the request part at fault."""

    detail: str
    loc: list[str | int] | None = Field(None, description="The request part at fault, e.g. [\"header\", \"Authorization\"]")


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, ["header", "Authorization"], {"WWW-Authenticate": "Bearer"})


def not_found(what: str, ident: str, field: str) -> ApiError:
    return ApiError(404, f"no {what} {ident}", ["path", field])


def invalid(detail: str, loc: list[str | int]) -> ApiError:
    return ApiError(422, detail, loc)


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


def _field_located(error: dict[str, Any]) -> dict[str, Any]:
    """Point errors of the pipeline union at the field itself.

    pydantic reports an unknown tag at the union itself and puts the chosen member's tag into
    the location of its fields' errors; clients want `body.pipeline` and
    `body.params.count`.
    """
    raw = list(error.get("loc", ()))
    loc = [part for before, part in zip([None, *raw], raw) if not _is_union_tag(before, part)]
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        # A callable discriminator reports itself as "name()"; ours are named after the field.
        discriminator = str(error.get("ctx", {}).get("discriminator", "")).strip("'").removesuffix("()")
        if discriminator and discriminator.isidentifier() and (not loc or loc[-1] != discriminator):
            loc.append(discriminator)
    return {**error, "loc": loc}


def _is_union_tag(parent: object, part: object) -> bool:
    # `job`: the job spec inside a schedule (POST /v1/schedules) is the same union.
    return (parent in ("body", "job") and part in PIPELINE_NAMES) or (parent == "sharding" and part in SHARDING_STRATEGIES)


def json_safe(value: Any) -> Any:
    """`value` (already JSON-shaped) with what strict JSON in UTF-8 cannot hold made printable.

    A validation error echoes the client's input: a lone surrogate (`"\\ud800"`) cannot be
    encoded as UTF-8 and NaN/Infinity are not JSON, so echoed as they are the 422 itself would
    fail (a 500). Such a string shows its surrogates as `\\udXXX` escapes, such a number as the
    text `NaN`, `Infinity` or `-Infinity`.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogate(value) else value
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(status_code=error.status, content=error.body(), headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_located(e) for e in exc.errors()]
        return JSONResponse(status_code=422, content=json_safe(jsonable_encoder({"detail": errors})))

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": f"no job {exc}"})

    @app.exception_handler(JobStillRunning)
    async def _running(_: Request, exc: JobStillRunning) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(ResultExpired)
    async def _expired(_: Request, exc: ResultExpired) -> JSONResponse:
        return JSONResponse(status_code=410, content={"detail": str(exc), "loc": ["path", "task_id"]})

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(DuplicateJob)
    async def _duplicate(_: Request, error: DuplicateJob) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(error), "loc": ["body"]})


STORE_RETRY_AFTER_S = 5  # a store that does not answer is usually restarting or failing over

UNAVAILABLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "The job store (MongoDB) does not answer; nothing was changed, retry later",
        "content": {"application/problem+json": {}},
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
    },
}


def install_unavailable_handler(app: FastAPI) -> None:
    """MongoDB unreachable (no server within CAIRN_MONGODB_SERVER_SELECTION_TIMEOUT_MS, a dropped
    or timed-out connection: pymongo's ConnectionFailure and its subclasses AutoReconnect,
    NetworkTimeout, ServerSelectionTimeoutError) → 503 naming the store, with Retry-After."""

    @app.exception_handler(ConnectionFailure)
    async def _store_unavailable(_: Request, error: ConnectionFailure) -> JSONResponse:
        warn_sparingly(
            ("mongodb", "request"), "MongoDB did not answer (%s: %s); answering 503", type(error).__name__, str(error)[:300]
        )
        return JSONResponse(
            status_code=503,
            content={"detail": f"the job store (MongoDB) is unavailable; retry in {STORE_RETRY_AFTER_S} s"},
            media_type="application/problem+json",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )
