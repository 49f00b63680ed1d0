"""Error answers of the task API: every 4xx names what is wrong and, where there is one, the
field at fault (`loc`, as in validation errors: `["header", "Authorization"]`, `["path",
"job_id"]`, `["body", "cron"]`). The OpenAPI document describes each of them."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


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


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(status_code=error.status, content=error.body(), headers=error.headers)
