"""`/v1/jobs`: the versioned jobs resource, beside `/task/*`.

Create answers 202 with the id and a Location; the job runs in the background and nothing here
waits for it. A GET needs the `read` scope, everything else `submit`.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response, status

from cairn_contracts.bounds import Moment
from cairn_contracts.jobs import PIPELINE_NAME, JobSpec
from cairn_contracts.states import JobState
from cairn_gateway.api.deps import Caller, Jobs
from cairn_gateway.jobs import JobFilter
from cairn_gateway.jobs_schemas import JobAccepted, JobCounts, JobDetail, JobPage, JobResultBody, JobSummary
from cairn_gateway.problems import Problem

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such job for this tenant"}}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={
        409: {"model": Problem, "description": "Idempotency-Key reused with another body, or an identical job is not finished yet"},
        422: {"model": Problem, "description": "A field refused: by the spec, or by the pipeline's announced params schema (GET /v1/pipelines)"},
    },
)
async def create_job(
    spec: Annotated[JobSpec, Body()],
    jobs: Jobs,
    caller: Caller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, description="Same key, same job")] = None,
) -> JobAccepted:
    """Record the job and publish its start command. The same Idempotency-Key (same tenant) returns
    the same job; a job identical to an unfinished one of the tenant is refused (409)."""
    submission = await jobs.submit(spec, caller.tenant, idempotency_key)
    url = f"/v1/jobs/{submission.job_id}"
    response.headers["Location"] = url
    return JobAccepted(id=submission.job_id, state=submission.state, created=submission.created, url=url)


@router.get("", response_model=JobPage)
async def list_jobs(
    jobs: Jobs,
    caller: Caller,
    state: JobState | None = None,
    pipeline: Annotated[str | None, Query(pattern=PIPELINE_NAME)] = None,
    priority: Annotated[int | None, Query(ge=1, le=4)] = None,
    created_after: Annotated[Moment | None, Query(description="Created at or after (ISO 8601)")] = None,
    created_before: Annotated[Moment | None, Query(description="Created before (ISO 8601)")] = None,
    # No NUL: the text becomes a BSON regular expression, a C string.
    q: Annotated[
        str | None, Query(min_length=1, max_length=200, pattern="^[^\\x00]+$", description="Case-insensitive text in the name")
    ] = None,
    schedule_id: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page")] = None,
) -> JobPage:
    """The tenant's jobs (an operator's: every tenant's), newest first, filtered by every parameter given."""
    job_filter = JobFilter(state, pipeline, priority, created_after, created_before, q, schedule_id)
    return await jobs.list(caller.view, job_filter, limit, cursor)


@router.get("/counts", response_model=JobCounts)
async def count_jobs(jobs: Jobs, caller: Caller) -> JobCounts:
    """How many of the tenant's jobs are in each state."""
    return await jobs.counts(caller.view)


@router.get("/{job_id}", response_model=JobDetail, responses=NOT_FOUND)
async def get_job(
    job_id: str,
    jobs: Jobs,
    caller: Caller,
    shard_limit: Annotated[int, Query(ge=0, le=1000, description="Shards per page")] = 100,
    shards_after: Annotated[str | None, Query(max_length=200, description="`shards_next_cursor` of the previous page")] = None,
) -> JobDetail:
    """The job, its spec, progress and one page of its shards (state, attempts, checkpoint
    cursor, records); the summary costs the same whatever the job's shard count."""
    return await jobs.get(caller.view, job_id, shard_limit, shards_after)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobSummary,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The job has finished (SUCCESS, FAILURE, or already CANCELLED)"}},
)
async def cancel_job(job_id: str, jobs: Jobs, caller: Caller) -> JobSummary:
    """Cancel cooperatively: shards not started never start, running ones stop at their next batch
    boundary keeping their checkpoint; the job ends CANCELLED (CANCELLING until then)."""
    return await jobs.cancel(caller.tenant, job_id, caller.name or caller.key_id)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The job is not finished"}},
)
async def delete_job(job_id: str, jobs: Jobs, caller: Caller) -> Response:
    """Delete a finished job with its shards and checkpoints; the records it stored stay."""
    await jobs.delete(caller.tenant, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{job_id}/result",
    response_model=JobResultBody,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "The job has not finished"},
        410: {"model": Problem, "description": "The result has expired (CAIRN_RESULT_TTL_S after the job finished)"},
    },
)
async def job_result(job_id: str, jobs: Jobs, caller: Caller) -> JobResultBody:
    """The result summary of a finished job, kept for CAIRN_RESULT_TTL_S."""
    return await jobs.result(caller.view, job_id)
