"""`/v1/schedules`: cron, interval and one-off schedules of a job, fired by the scheduler service.

A GET needs the `read` scope, everything else `submit`. See schedules.py (the service) for the semantics.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response, status

from cairn_gateway.api.deps import Caller, Schedules
from cairn_gateway.jobs_schemas import BatchDelete, BatchDeleted, NextRuns, SchedulePage, ScheduleUpdate, ScheduleView, TriggerAccepted
from cairn_gateway.problems import Problem
from cairn_gateway.schedules import ScheduleCreate

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such schedule for this tenant"}}
RACE: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "The schedule kept changing (runs fired meanwhile); try again"}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ScheduleView)
async def create_schedule(body: Annotated[ScheduleCreate, Body()], service: Schedules, caller: Caller, response: Response) -> ScheduleView:
    """Record a schedule; `next_run_at` says when it first runs."""
    view = await service.create(caller.tenant, body)
    response.headers["Location"] = view.url
    return view


@router.get("", response_model=SchedulePage)
async def list_schedules(
    service: Schedules,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> SchedulePage:
    """The tenant's schedules, newest first."""
    return await service.list(caller.tenant, limit, cursor)


@router.post("/batch-delete", response_model=BatchDeleted)
async def delete_schedules(body: Annotated[BatchDelete, Body()], service: Schedules, caller: Caller) -> BatchDeleted:
    """Delete up to 200 of the tenant's schedules by id; the jobs they fired stay."""
    return await service.delete_many(caller.tenant, body.ids)


@router.get("/{schedule_id}", response_model=ScheduleView, responses=NOT_FOUND)
async def get_schedule(schedule_id: str, service: Schedules, caller: Caller) -> ScheduleView:
    return await service.get(caller.tenant, schedule_id)


@router.patch("/{schedule_id}", response_model=ScheduleView, responses={**NOT_FOUND, **RACE})
async def update_schedule(schedule_id: str, patch: Annotated[ScheduleUpdate, Body()], service: Schedules, caller: Caller) -> ScheduleView:
    """Change fields; a timing change recomputes the next run from now (runs already fired count)."""
    return await service.update(caller.tenant, schedule_id, patch)


@router.put("/{schedule_id}", response_model=ScheduleView, responses={**NOT_FOUND, **RACE})
async def replace_schedule(schedule_id: str, body: Annotated[ScheduleCreate, Body()], service: Schedules, caller: Caller) -> ScheduleView:
    """Replace the whole schedule (fields left out take their defaults); run counters stay, the
    next run is recomputed from now."""
    return await service.replace(caller.tenant, schedule_id, body)


@router.get("/{schedule_id}/next", response_model=NextRuns, responses=NOT_FOUND)
async def next_runs(
    schedule_id: str, service: Schedules, caller: Caller, n: Annotated[int, Query(ge=1, le=100, description="How many runs")] = 5
) -> NextRuns:
    """The next `n` run times (none while paused)."""
    return await service.next_runs(caller.tenant, schedule_id, n)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, responses=NOT_FOUND)
async def delete_schedule(schedule_id: str, service: Schedules, caller: Caller) -> Response:
    """Delete the schedule; the jobs it fired stay."""
    await service.delete(caller.tenant, schedule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{schedule_id}/pause", response_model=ScheduleView, responses=NOT_FOUND)
async def pause_schedule(schedule_id: str, service: Schedules, caller: Caller) -> ScheduleView:
    return await service.pause(caller.tenant, schedule_id)


@router.post("/{schedule_id}/resume", response_model=ScheduleView, responses={**NOT_FOUND, **RACE})
async def resume_schedule(schedule_id: str, service: Schedules, caller: Caller) -> ScheduleView:
    """Runs missed while paused are skipped: the next run is the first one after now."""
    return await service.resume(caller.tenant, schedule_id)


@router.post(
    "/{schedule_id}/trigger",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TriggerAccepted,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "An identical job is not finished yet"}},
)
async def trigger_schedule(
    schedule_id: str,
    service: Schedules,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=150)] = None,
) -> TriggerAccepted:
    """Run the schedule's job now (a manual run: not counted in max_runs, the next run stays)."""
    return await service.trigger(caller.tenant, schedule_id, idempotency_key)
