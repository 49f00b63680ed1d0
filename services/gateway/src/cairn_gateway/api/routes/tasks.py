"""`/task/*`: start a job, read its status and its result. Nothing here waits for a job.

"Task" in these paths means a job (the first API's word); the Celery tasks that run a job's
shards are another thing (docs/design.md). The job logic is `JobService` (jobs.py), shared with
`/v1/jobs`.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response, status

from cairn_contracts.jobs import JobSpec
from cairn_gateway.api.deps import Jobs, Tenant, Viewer
from cairn_gateway.problems import Problem
from cairn_gateway.schemas import TaskAccepted, TaskResult, TaskStatus

router = APIRouter(prefix="/task", tags=["tasks"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such job for this tenant"}}


@router.post(
    "/start",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskAccepted,
    responses={409: {"model": Problem, "description": "Idempotency-Key reused with another body, or an identical job is not finished yet"}},
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


@router.get("/status/{task_id}", response_model=TaskStatus, responses=NOT_FOUND)
async def task_status(task_id: str, jobs: Jobs, tenant: Viewer) -> TaskStatus:
    return await jobs.status(tenant, task_id)


@router.get(
    "/result/{task_id}",
    response_model=TaskResult,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "The job is still running"},
        410: {"model": Problem, "description": "The result was kept CAIRN_RESULT_TTL_S after the job finished, and has expired"},
    },
)
async def task_result(task_id: str, jobs: Jobs, tenant: Viewer) -> TaskResult:
    result = await jobs.result(tenant, task_id)
    return TaskResult(task_id=result.id, state=result.state, result=result.result, finished_at=result.finished_at)
