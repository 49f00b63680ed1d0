"""Error responses: every 4xx names what is wrong, and validation errors name the field."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.encoders import jsonable_encoder

from cairn_contracts.jobs import SHARDING_STRATEGIES
from cairn_contracts.pipelines import PIPELINE_NAMES
from cairn_gateway.jobs import IdempotencyConflict, JobNotFound, JobStillRunning


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_located(e) for e in exc.errors()]
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": errors}))

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": f"no job {exc}"})

    @app.exception_handler(JobStillRunning)
    async def _running(_: Request, exc: JobStillRunning) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})
