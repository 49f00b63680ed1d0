"""Operations: `/healthz` (alive), `/readyz` (each dependency answers) and `/metrics` (Prometheus).

None of them needs an API key. Dependencies down (docs/design.md, "Dependencies down"): the
gateway answers without RabbitMQ and Redis, and 503 for a request that needs MongoDB; `/readyz`
says which dependency does not answer.
"""

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cairn_gateway.http_metrics import metrics_page
from cairn_runtime.amqp import BackgroundPublisher

router = APIRouter(tags=["ops"])
router.add_route("/metrics", metrics_page, include_in_schema=False)  # exactly /metrics, no redirect

READY_CHECK_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """Liveness: the process serves HTTP (200 `{"status": "ok"}`); it checks no dependency, so a
    supervisor never restarts a gateway for an outage a restart cannot fix."""
    return JSONResponse(content={"status": "ok"})


@router.get("/readyz", responses={503: {"description": "A dependency does not answer (the body names it)"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 if MongoDB, RabbitMQ and Redis all answer, else 503. Body:
    `{"status": "ready" | "unavailable", "dependencies": {"mongodb" | "rabbitmq" | "redis":
    {"status": "ok" | "unavailable", "error": str (when unavailable)}}}`. Each check is
    bounded by READY_CHECK_TIMEOUT_S. Without RabbitMQ or Redis the gateway still accepts
    jobs (relayed later; no cache, rate limit or job lock), without MongoDB it answers 503."""
    state = request.app.state
    results = await asyncio.gather(
        _check(state.mongo.admin.command("ping")),
        _check(_broker_connected(state.publisher)),
        _check(state.cache.ping()),
    )
    dependencies = dict(zip(("mongodb", "rabbitmq", "redis"), results, strict=True))
    ready = all(d["status"] == "ok" for d in dependencies.values())
    return JSONResponse(
        status_code=200 if ready else 503,
        content={"status": "ready" if ready else "unavailable", "dependencies": dependencies},
    )


async def _broker_connected(publisher: BackgroundPublisher) -> None:
    if not publisher.connected:
        raise ConnectionError("not connected to RabbitMQ (reconnecting in the background)")


async def _check(probe: Awaitable[object]) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await probe
    except Exception as error:  # any failure of a probe means "not ready", with its reason
        return {"status": "unavailable", "error": f"{type(error).__name__}: {error}"[:300]}
    return {"status": "ok"}
