"""The FastAPI dependencies every route shares: the services app.py put on `app.state`, the
caller (API key → `Principal`, its rate limit, its scope) and the requester of a DLQ command.

Routes declare what they need with these `Annotated` names (`jobs: Jobs, caller: Caller`); no
route reads `app.state` itself. Errors are domain errors (Unauthorized, Forbidden, RateLimited),
answered by problems.py.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cairn_gateway.auth import KeyService, KeyVerifier, Principal, check_scope, method_scope
from cairn_gateway.dlq import DeadLetterService
from cairn_gateway.jobs import JobService
from cairn_gateway.schedules import ScheduleService
from cairn_gateway.tenants import TenantService
from cairn_gateway.workers import WorkerControl

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="cairn_<key id>_<secret>",
    description="An API key. The first admin key comes from `cairn-gateway-admin create-key --tenant T --scopes admin`.",
)


def job_service(request: Request) -> JobService:
    return request.app.state.jobs


def schedule_service(request: Request) -> ScheduleService:
    return request.app.state.schedules


def dead_letter_service(request: Request) -> DeadLetterService:
    return request.app.state.dead_letters


def worker_control(request: Request) -> WorkerControl:
    return request.app.state.workers


def key_verifier(request: Request) -> KeyVerifier:
    return request.app.state.key_verifier


def key_service(request: Request) -> KeyService:
    return request.app.state.keys


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller, from its API key (401 otherwise); its rate limit is applied here (429)."""
    principal = await key_verifier(request).authenticate(credentials.credentials if credentials else None)
    await request.app.state.rate_limiter.check(principal)
    return principal


async def authorized(request: Request, principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """The caller, allowed to read (GET) or to submit (anything else); 403 otherwise."""
    check_scope(principal, method_scope(request.method))
    return principal


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller, authorized for the method and holding `scope` (403 otherwise)."""

    async def dependency(principal: Annotated[Principal, Depends(authorized)]) -> Principal:
        check_scope(principal, scope)
        return principal

    return dependency


async def operator(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """The caller, holding `operator` (a tenant's `admin` does not imply it): worker control reads and commands alike, so an
    operator's key needs neither `read` nor `submit`; 403 otherwise."""
    check_scope(principal, "operator")
    return principal


def tenant(principal: Annotated[Principal, Depends(authorized)]) -> str:
    """The authenticated caller's tenant (from its API key)."""
    return principal.tenant


def viewer(principal: Annotated[Principal, Depends(authorized)]) -> str:
    """The tenant the caller reads (and acts on dead letters) as: its own, or `ALL_TENANTS`
    (`*`) for an `operator` key (cross-tenant)."""
    return principal.view


def tenant_service(request: Request) -> TenantService:
    return request.app.state.tenants


@dataclass(frozen=True)
class Requester:
    """Who asked for a DLQ command: an operator's name, and the API key used (recorded either way)."""

    name: str
    api_key_id: str | None


def requester(
    caller: Annotated[Principal, Depends(authorized)], x_cairn_actor: Annotated[str | None, Header(max_length=200)] = None
) -> Requester:
    """The `X-Cairn-Actor` header (an operator's name), else the API key's name (else its id)."""
    named = x_cairn_actor.strip() if x_cairn_actor else ""
    return Requester(named or caller.name or caller.key_id or caller.tenant, caller.key_id)


def operator_requester(
    caller: Annotated[Principal, Depends(operator)], x_cairn_actor: Annotated[str | None, Header(max_length=200)] = None
) -> Requester:
    """As `requester`, for worker control (an operator's key needs no `submit`)."""
    return requester(caller, x_cairn_actor)


Caller = Annotated[Principal, Depends(authorized)]
Admin = Annotated[Principal, Depends(require_scope("admin"))]
Operator = Annotated[Principal, Depends(operator)]
OperatorActor = Annotated[Requester, Depends(operator_requester)]
Tenant = Annotated[str, Depends(tenant)]
Viewer = Annotated[str, Depends(viewer)]
Actor = Annotated[Requester, Depends(requester)]
Jobs = Annotated[JobService, Depends(job_service)]
Schedules = Annotated[ScheduleService, Depends(schedule_service)]
DeadLetters = Annotated[DeadLetterService, Depends(dead_letter_service)]
Keys = Annotated[KeyService, Depends(key_service)]
Workers = Annotated[WorkerControl, Depends(worker_control)]
Tenants = Annotated[TenantService, Depends(tenant_service)]
