"""API keys: every request but /healthz, /readyz, /metrics and the OpenAPI pages needs one.

A key is `cairn_<key id>_<secret>`. The `api_keys` collection keeps its id, tenant, scopes, name
and the sha256 of the secret (never the secret; compared in constant time). The tenant comes
from the key: whoever holds it sees only that tenant's jobs, schedules and dead letters.

Scopes: `submit` (create, cancel and delete jobs and schedules), `read` (get and list), `admin`
(dead letters and key management; implies the other two). A GET needs `read`, anything else
`submit`; the dead-letter and key routers also need `admin`.

Looked-up keys are cached in-process for `CAIRN_AUTH_CACHE_TTL_S` seconds, so a revocation
takes effect within that time.
"""

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.store import API_KEYS
from cairn_gateway.problems import ApiError, unauthorized

SCOPES = ("submit", "read", "admin")
TOKEN_PREFIX = "cairn_"
_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str | None = None
    rate_limit_per_minute: int | None = None  # the key's own limit; None: the gateway's setting

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> list[str]:
    wanted = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown or not wanted:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}")
    return wanted


def new_key(
    tenant: str, scopes: Iterable[str], name: str | None = None, *, rate_limit_per_minute: int | None = None
) -> tuple[dict[str, Any], str]:
    """A new key's document and its token (shown once: only the secret's hash is stored)."""
    if not tenant or not tenant.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(tenant) > 64:
        raise ValueError("tenant: 1-64 letters, digits, '-', '_' or '.'")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    document = {
        "_id": key_id,
        "tenant": tenant,
        "scopes": parse_scopes(scopes),
        "name": name,
        "secret_hash": hash_secret(secret),
        "rate_limit_per_minute": rate_limit_per_minute,
        "created_at": datetime.now(UTC),
        "created_at_ms": int(time.time() * 1000),
        "revoked_at": None,
    }
    return document, f"{TOKEN_PREFIX}{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    key_id, _, secret = token[len(TOKEN_PREFIX):].partition("_")
    if not key_id or not secret or len(key_id) > 64:
        return None
    return key_id, secret


class KeyVerifier:
    """Checks bearer tokens against `api_keys`, caching looked-up key documents briefly."""

    def __init__(self, db: AsyncDatabase, cache_ttl_s: float) -> None:
        self._keys = db[API_KEYS]
        self._ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def verify(self, token: str) -> Principal | None:
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        document = await self._document(key_id)
        if document is None or document.get("revoked_at") is not None:
            return None
        if not hmac.compare_digest(hash_secret(secret), str(document.get("secret_hash", ""))):
            return None
        return Principal(
            key_id=key_id,
            tenant=document["tenant"],
            scopes=frozenset(document.get("scopes") or ()),
            name=document.get("name"),
            rate_limit_per_minute=document.get("rate_limit_per_minute"),
        )

    async def _document(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        document = await self._keys.find_one({"_id": key_id})
        if self._ttl_s > 0:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key_id] = (now + self._ttl_s, document)
        return document

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)


bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="cairn_<key id>_<secret>",
    description="An API key. The first admin key comes from `cairn-gateway-admin create-key --tenant T --scopes admin`.",
)


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller, from its API key; its rate limit is applied here (429)."""
    if credentials is None:
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
    principal = await request.app.state.keys.verify(credentials.credentials)
    if principal is None:
        raise unauthorized("unknown or revoked API key")
    await request.app.state.rate_limiter.check(principal)
    return principal


def method_scope(method: str) -> str:
    return "read" if method in ("GET", "HEAD") else "submit"


async def authorized(request: Request, principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """The caller, allowed to read (GET) or to submit (anything else)."""
    scope = method_scope(request.method)
    if not principal.allows(scope):
        raise ApiError(403, f"this API key lacks the {scope!r} scope", ["header", "Authorization"])
    return principal


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    async def dependency(principal: Annotated[Principal, Depends(authorized)]) -> Principal:
        if not principal.allows(scope):
            raise ApiError(403, f"this API key lacks the {scope!r} scope", ["header", "Authorization"])
        return principal

    return dependency


Caller = Annotated[Principal, Depends(authorized)]
