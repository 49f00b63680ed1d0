"""`/v1/workers` and `/v1/shards/{shard_key}/terminate|revoke`: worker control over Celery's
remote control (workers.py). Needs the `operator` scope (not implied by a tenant's `admin`): workers are shared by every
tenant, so these routes are cluster-wide."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from cairn_gateway.api.deps import Operator, OperatorActor, Workers
from cairn_gateway.problems import Problem

router = APIRouter(tags=["workers"])

# Printable names only: they go into broker messages (remote control) and MongoDB queries.
HOSTNAME = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9@._:+-]{1,200}$", description="The worker's Celery node name, e.g. cairn-ingest@worker-1")
]
SHARD_KEY = Annotated[str, Path(pattern=r"^[A-Za-z0-9@._:+-]{1,300}$", description="e.g. <job id>:0001")]
KIND = Annotated[str, Path(pattern=r"^[a-z_]{1,40}$", description="active, reserved, scheduled, stats, registered, revoked, active_queues")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such worker answered in time, or no such shard"}}
REFUSED: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "The worker refused the command, or the shard is not in a state it applies to"}}


class PoolChange(BaseModel):
    n: int = Field(1, ge=1, le=64, description="Processes to add or remove")


class Autoscale(BaseModel):
    max: int = Field(..., ge=1, le=64, description="Most pool processes")
    min: int = Field(..., ge=0, le=64, description="Fewest pool processes")


class Terminate(BaseModel):
    then: Literal["ready", "cancelled"] = Field(
        "ready", description="ready: the shard runs again from its checkpoint (RETRY, due now); cancelled: it ends CANCELLED"
    )


@router.get("/v1/workers")
async def list_workers(_: Operator, workers: Workers) -> list[dict[str, Any]]:
    """The live workers (those answering within CAIRN_WORKER_CONTROL_TIMEOUT_S): pool size and
    processes, running tasks and the shards whose leases they hold, processed counts by task,
    uptime and heartbeat age (seconds)."""
    return await workers.list_workers()


@router.get("/v1/workers/{hostname}/inspect/{kind}", responses=NOT_FOUND)
async def inspect_worker(hostname: HOSTNAME, kind: KIND, _: Operator, workers: Workers) -> Any:
    """`celery inspect <kind>` of one worker: active, reserved, scheduled, stats, registered,
    revoked, active_queues."""
    return await workers.inspect(hostname, kind)


@router.post("/v1/workers/{hostname}/pool/grow", responses={**NOT_FOUND, **REFUSED})
async def grow(hostname: HOSTNAME, body: PoolChange, _: Operator, workers: Workers) -> dict[str, Any]:
    return await workers.grow(hostname, body.n)


@router.post("/v1/workers/{hostname}/pool/shrink", responses={**NOT_FOUND, **REFUSED})
async def shrink(hostname: HOSTNAME, body: PoolChange, _: Operator, workers: Workers) -> dict[str, Any]:
    return await workers.shrink(hostname, body.n)


@router.post("/v1/workers/{hostname}/pool/autoscale", responses={**NOT_FOUND, **REFUSED})
async def autoscale(hostname: HOSTNAME, body: Autoscale, _: Operator, workers: Workers) -> dict[str, Any]:
    """Set the autoscale bounds (only a worker started with autoscale accepts it: 409 otherwise)."""
    return await workers.autoscale(hostname, body.max, body.min)


@router.post("/v1/workers/{hostname}/pool/restart", responses={**NOT_FOUND, **REFUSED})
async def pool_restart(hostname: HOSTNAME, _: Operator, workers: Workers) -> dict[str, Any]:
    """Replace the pool's processes (running tasks finish first; each new process builds its own
    MongoDB client)."""
    return await workers.pool_restart(hostname)


@router.post("/v1/workers/{hostname}/shutdown", responses=NOT_FOUND)
async def shutdown(hostname: HOSTNAME, _: Operator, workers: Workers) -> dict[str, Any]:
    """Graceful (warm) shutdown of one worker."""
    return await workers.shutdown(hostname)


@router.post("/v1/shards/{shard_key}/terminate", responses={**NOT_FOUND, **REFUSED})
async def terminate_shard(shard_key: SHARD_KEY, actor: OperatorActor, workers: Workers, body: Terminate | None = None) -> dict[str, Any]:
    """Stop a RUNNING shard now: its lease released, the batch in flight not committed (fencing
    token bumped), the shard back to ready (RETRY, due now) or CANCELLED as asked (no body:
    ready)."""
    return await workers.terminate_shard(shard_key, (body or Terminate()).then, actor.name)


@router.post("/v1/shards/{shard_key}/revoke", responses={**NOT_FOUND, **REFUSED})
async def revoke_shard(shard_key: SHARD_KEY, actor: OperatorActor, workers: Workers) -> dict[str, Any]:
    """Cancel a shard that has not started yet (PLANNED, QUEUED or RETRY)."""
    return await workers.revoke_shard(shard_key, actor.name)
