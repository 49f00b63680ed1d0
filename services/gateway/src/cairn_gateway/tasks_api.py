"""The task API: start a job, read its status and its result. Nothing here waits for a job."""

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Request, Response, status

from cairn_contracts.jobs import JobSpec
from cairn_gateway.auth import Principal, authorized
from cairn_gateway.jobs import JobService
from cairn_gateway.schemas import ErrorBody, TaskAccepted, TaskResult, TaskStatus

router = APIRouter(prefix="/task", tags=["tasks"])


def job_service(request: Request) -> JobService:
    return request.app.state.jobs


def tenant(principal: Annotated[Principal, Depends(authorized)]) -> str:
    """The authenticated caller's tenant (from its API key; a GET needs `read`, the rest `submit`)."""
    return principal.tenant


Jobs = Annotated[JobService, Depends(job_service)]
Tenant = Annotated[str, Depends(tenant)]


@router.post(
    "/start",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskAccepted,
    responses={409: {"model": ErrorBody, "description": "Idempotency-Key reused with another body"}},
)
async def start_task(
    spec: Annotated[JobSpec, Body()],
    jobs: Jobs,
    tenant: Tenant,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Record the job and publish its start command; 202 once recorded (and, normally, confirmed)."""
    submission = await jobs.submit(spec, tenant, idempotency_key)
    status_url = f"/task/status/{submission.job_id}"
    response.headers["Location"] = status_url
    return TaskAccepted(task_id=submission.job_id, state=submission.state, status_url=status_url, created=submission.created)


@router.get("/status/{task_id}", response_model=TaskStatus, responses={404: {"model": ErrorBody}})
async def task_status(task_id: str, jobs: Jobs, tenant: Tenant) -> TaskStatus:
    return await jobs.status(task_id, tenant)


@router.get(
    "/result/{task_id}",
    response_model=TaskResult,
    responses={
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "The job is still running"},
        410: {"model": ErrorBody, "description": "The result was kept CAIRN_RESULT_TTL_S after the job finished, and has expired"},
    },
)
async def task_result(task_id: str, jobs: Jobs, tenant: Tenant) -> TaskResult:
    return await jobs.result(task_id, tenant)
