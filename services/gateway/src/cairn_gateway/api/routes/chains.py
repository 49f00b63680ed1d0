"""`/v1/chains`: jobs run one after another (README "Workflows"). Create answers 202 with the
chain's id and its steps' job ids; nothing waits for a step. A GET needs the `read` scope,
everything else `submit`. See chains.py (the service) for how a chain is recorded."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status

from cairn_gateway.api.deps import Caller
from cairn_gateway.chains import ChainService
from cairn_gateway.jobs_schemas import ChainAccepted, ChainPage, ChainSpec, ChainView
from cairn_gateway.problems import Problem

router = APIRouter(prefix="/v1/chains", tags=["chains"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such chain for this tenant"}}


def chain_service(request: Request) -> ChainService:
    return request.app.state.chains


Chains = Annotated[ChainService, Depends(chain_service)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ChainAccepted,
    responses={
        409: {"model": Problem, "description": "Idempotency-Key reused with another body"},
        422: {"model": Problem, "description": "A step's field refused, located as [\"body\", \"steps\", i, ...]"},
    },
)
async def create_chain(
    chain: Annotated[ChainSpec, Body()],
    chains: Chains,
    caller: Caller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, description="Same key, same chain")] = None,
) -> ChainAccepted:
    """Record the chain's steps as jobs (step i+1 waits for step i) and start step 0."""
    accepted = await chains.submit(chain, caller.tenant, idempotency_key)
    response.headers["Location"] = accepted.url
    return accepted


@router.get("", response_model=ChainPage)
async def list_chains(
    chains: Chains,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page")] = None,
) -> ChainPage:
    """The tenant's chains, newest first, each with its state and steps."""
    return await chains.list(caller.tenant, limit, cursor)


@router.get("/{chain_id}", response_model=ChainView, responses=NOT_FOUND)
async def get_chain(chain_id: str, chains: Chains, caller: Caller) -> ChainView:
    """The chain: its state (derived from its steps), the current step, each step's job and progress."""
    return await chains.get(caller.tenant, chain_id)


@router.post("/{chain_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=ChainView, responses=NOT_FOUND)
async def cancel_chain(chain_id: str, chains: Chains, caller: Caller) -> ChainView:
    """Cancel every step that has not finished (each as POST /v1/jobs/{id}/cancel)."""
    return await chains.cancel(caller.tenant, chain_id, caller.name or caller.key_id)
