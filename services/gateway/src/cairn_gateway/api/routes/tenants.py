"""`/v1/tenants/{tenant}`: a tenant's quotas, namespace and granted sources.

An operator (the cross-tenant `operator` scope) reads and sets any tenant's; any other key reads
its own tenant's only (another tenant's answers 404, as elsewhere).
"""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path

from cairn_contracts.tenancy import TENANT_NAME_PATTERN, TenantRecord
from cairn_gateway.api.deps import Caller, Operator, Tenants
from cairn_gateway.jobs_schemas import TenantView
from cairn_gateway.problems import Problem
from cairn_gateway.tenants import TenantNotFound, TenantService

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

TenantName = Annotated[str, Path(pattern=TENANT_NAME_PATTERN, description="The tenant's name (as its API keys carry it)")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "Not the caller's tenant (and the caller is no operator)"}}


async def _view(tenants: TenantService, tenant: str) -> TenantView:
    record = await tenants.record(tenant)
    return TenantView(
        tenant=tenant,
        namespace=tenants.namespace(tenant),
        quotas=record.quotas,
        effective_quotas=record.quotas.merged(tenants.defaults),
        sources=record.sources,
    )


@router.get("/{tenant}", response_model=TenantView, responses=NOT_FOUND)
async def get_tenant(tenant: TenantName, caller: Caller, tenants: Tenants) -> TenantView:
    """The tenant's namespace database, its own quotas, the quotas in force and its granted sources."""
    if tenant != caller.tenant and not caller.allows("operator"):
        raise TenantNotFound(tenant)
    return await _view(tenants, tenant)


@router.put("/{tenant}", response_model=TenantView, responses={422: {"model": Problem, "description": "A grant names Cairn's database or a tenant namespace"}})
async def put_tenant(tenant: TenantName, body: Annotated[TenantRecord, Body()], caller: Operator, tenants: Tenants) -> TenantView:
    """Set the tenant's quotas (unset: the deployment's defaults) and the source collections of
    other databases its mongo_range jobs may read. Needs the `operator` scope."""
    await tenants.put(tenant, body)
    return await _view(tenants, tenant)
