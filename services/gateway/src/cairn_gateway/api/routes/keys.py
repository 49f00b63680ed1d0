"""`/v1/keys`: a tenant's admin manages the tenant's API keys (the first one comes from
`cairn-gateway-admin create-key`). Needs the `admin` scope."""

from typing import Any

from fastapi import APIRouter, Response, status

from cairn_gateway.api.deps import Admin, Keys
from cairn_gateway.jobs_schemas import KeyCreate, KeyCreated, KeyView
from cairn_gateway.problems import Problem

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def _view(key: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": key["_id"],
        "tenant": key["tenant"],
        "scopes": key.get("scopes") or [],
        "name": key.get("name"),
        "rate_limit_per_minute": key.get("rate_limit_per_minute"),
        "created_at": key.get("created_at"),
        "revoked": key.get("revoked_at") is not None,
    }


@router.post("", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_key(body: KeyCreate, caller: Admin, keys: Keys) -> KeyCreated:
    """A new key of the caller's tenant; its token is in this answer only."""
    document, token = await keys.create(caller.tenant, body.scopes, body.name, body.rate_limit_per_minute, creator=caller)
    return KeyCreated(**_view(document), token=token)


@router.get("", response_model=list[KeyView])
async def list_keys(caller: Admin, keys: Keys) -> list[KeyView]:
    return [KeyView(**_view(key)) for key in await keys.list(caller.tenant)]


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={404: {"model": Problem, "description": "No such key for this tenant"}},
)
async def revoke_key(key_id: str, caller: Admin, keys: Keys) -> Response:
    """Revoke a key of the tenant (effective within CAIRN_AUTH_CACHE_TTL_S on every gateway)."""
    await keys.revoke(caller.tenant, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
