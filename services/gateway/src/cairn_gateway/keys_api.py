"""`/v1/keys`: a tenant's admin manages the tenant's API keys (the first one comes from
`cairn-gateway-admin create-key`). Needs the `admin` scope."""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status

from cairn_contracts.store import API_KEYS
from cairn_gateway.auth import Principal, new_key, require_scope
from cairn_gateway.problems import Problem, invalid, not_found
from cairn_gateway.jobs_schemas import KeyCreate, KeyCreated, KeyView

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Admin = Annotated[Principal, Depends(require_scope("admin"))]


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
async def create_key(body: KeyCreate, caller: Admin, request: Request) -> KeyCreated:
    """A new key of the caller's tenant; its token is in this answer only."""
    try:
        document, token = new_key(caller.tenant, body.scopes, body.name, rate_limit_per_minute=body.rate_limit_per_minute)
    except ValueError as error:
        raise invalid(str(error), ["body", "scopes"]) from None
    await request.app.state.mongo_db[API_KEYS].insert_one(document)
    return KeyCreated(**_view(document), token=token)


@router.get("", response_model=list[KeyView])
async def list_keys(caller: Admin, request: Request) -> list[KeyView]:
    found = request.app.state.mongo_db[API_KEYS].find({"tenant": caller.tenant}, {"secret_hash": 0}).sort("created_at_ms", 1)
    return [KeyView(**_view(key)) async for key in found]


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={404: {"model": Problem, "description": "No such key for this tenant"}},
)
async def revoke_key(key_id: str, caller: Admin, request: Request) -> Response:
    """Revoke a key of the tenant (effective within CAIRN_AUTH_CACHE_TTL_S on every gateway)."""
    result = await request.app.state.mongo_db[API_KEYS].update_one(
        {"_id": key_id, "tenant": caller.tenant}, {"$set": {"revoked_at": datetime.now(UTC).isoformat()}}
    )
    if result.matched_count == 0:
        raise not_found("key", key_id, "key_id")
    request.app.state.keys.forget(key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
