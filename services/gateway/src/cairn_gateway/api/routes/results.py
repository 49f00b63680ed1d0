"""`/v1/results`: finished jobs with their result, runtime, failed shards and workers; batch
delete of results or whole jobs. A GET needs the `read` scope, the batch delete `submit`.
See results.py (the service) for the semantics."""

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request

from cairn_contracts.states import JobState
from cairn_gateway.api.deps import Caller
from cairn_gateway.errors import Invalid
from cairn_gateway.jobs_schemas import BatchDeleted
from cairn_gateway.results import ResultPage, ResultsBatchDelete, ResultService

router = APIRouter(prefix="/v1/results", tags=["results"])


def result_service(request: Request) -> ResultService:
    return request.app.state.results


Results = Annotated[ResultService, Depends(result_service)]


@router.get("", response_model=ResultPage)
async def list_results(
    service: Results,
    caller: Caller,
    state: Annotated[JobState | None, Query(description="One terminal state: SUCCESS, FAILURE or CANCELLED")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page")] = None,
) -> ResultPage:
    """The tenant's finished jobs, newest first: result, runtime, failed shards (error and
    traceback summary), workers."""
    if state is not None and not state.is_terminal:
        raise Invalid(f"{state} is not a finished state: give SUCCESS, FAILURE or CANCELLED", ("query", "state"), value=str(state))
    return await service.page(caller.tenant, limit, cursor, state)


@router.post("/batch-delete", response_model=BatchDeleted)
async def delete_results(body: Annotated[ResultsBatchDelete, Body()], service: Results, caller: Caller) -> BatchDeleted:
    """Delete up to 200 results (`scope: result`) or finished jobs (`scope: job`) by id."""
    return await service.delete_many(caller.tenant, body)
