"""API keys: every request but /healthz, /readyz, /metrics and the OpenAPI pages needs one.

A key is `cairn_<key id>_<secret>`. The `api_keys` collection keeps its id, tenant, scopes, name
and the sha256 of the secret (never the secret; compared in constant time). The tenant comes
from the key: whoever holds it sees only that tenant's jobs, schedules and dead letters.

Scopes (`IMPLIED`, the one definition): `read` (get and list), `submit` (create, cancel and
delete jobs and schedules), `admin` (its tenant's dead letters and keys; implies `submit` and
`read`), `operator` (cross-tenant: worker control, /v1/workers and shard terminate/revoke, as the
workers are shared; reads every tenant's jobs and dead letters and acts on any dead letter
(`Principal.view` = `ALL_TENANTS`); sets tenants' quotas and source grants; implies the three
others). `admin` never implies `operator`: a tenant's admin sees and controls one tenant; only the
command line or an operator key grants it. A GET needs `read`, anything else `submit`; the
dead-letter and key routers also need `admin`. The FastAPI dependencies that apply this to a
request are in api/deps.py.

Looked-up keys are cached in-process for `CAIRN_AUTH_CACHE_TTL_S` seconds, so a revocation
takes effect within that time.
"""

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.store import API_KEYS
from cairn_contracts.tenancy import TENANT_NAME_PATTERN
from cairn_gateway.errors import Forbidden, Invalid, NotFound, Unauthorized

SCOPES = ("submit", "read", "operator", "admin")
# What each scope grants. `admin` never implies `operator` (a tenant's admin manages one tenant).
IMPLIED: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "submit": frozenset({"submit"}),
    "admin": frozenset({"admin", "submit", "read"}),
    "operator": frozenset({"operator", "admin", "submit", "read"}),
}
# The tenant an operator reads as: every tenant. No key can carry "*" (`new_key` allows letters,
# digits, '-', '_' and '.'), so it is never a real tenant's name.
ALL_TENANTS = "*"
TOKEN_PREFIX = "cairn_"
_CACHE_LIMIT = 10_000


class KeyNotFound(NotFound):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key {key_id}", key_id)


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str | None = None
    rate_limit_per_minute: int | None = None  # the key's own limit; None: the gateway's setting

    def allows(self, scope: str) -> bool:
        """Whether the key holds `scope` or a scope implying it (`IMPLIED`): an admin manages one
        tenant, an operator every tenant and the workers they share."""
        return any(scope in IMPLIED.get(held, frozenset()) for held in self.scopes)

    @property
    def view(self) -> str:
        """The tenant this caller reads as: its own, or `ALL_TENANTS` for an operator."""
        return ALL_TENANTS if self.allows("operator") else self.tenant


def tenant_match(tenant: str) -> dict[str, Any]:
    """The query clause selecting `tenant`'s documents: `{}` for `ALL_TENANTS` (an operator)."""
    return {} if tenant == ALL_TENANTS else {"tenant": tenant}


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
    if not re.fullmatch(TENANT_NAME_PATTERN, tenant):
        raise ValueError("tenant: 1-64 ASCII letters, digits, '-', '_' or '.'")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    document = {
        "_id": key_id,
        "tenant": tenant,
        "scopes": parse_scopes(scopes),
        "name": name,
        "secret_hash": hash_secret(secret),
        "rate_limit_per_minute": rate_limit_per_minute,
        "created_at": clock.utcnow(),
        "created_at_ms": clock.now_ms(),
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

    async def authenticate(self, token: str | None) -> Principal:
        """The principal of a bearer token. Raises `Unauthorized` for no token, or one that is
        malformed, unknown or revoked."""
        if token is None:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        principal = await self.verify(token)
        if principal is None:
            raise Unauthorized("unknown or revoked API key")
        return principal

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


class KeyService:
    """A tenant's API keys over HTTP (`/v1/keys`); the command line has admin.py."""

    def __init__(self, db: AsyncDatabase, verifier: KeyVerifier) -> None:
        self._keys = db[API_KEYS]
        self._verifier = verifier

    async def create(
        self, tenant: str, scopes: Iterable[str], name: str | None, rate_limit_per_minute: int | None,
        creator: Principal | None = None,
    ) -> tuple[dict[str, Any], str]:
        """The new key's document and its token (shown once). Raises `Invalid` on `scopes`,
        `Forbidden` when `creator` (the calling key) would grant `operator` without holding it."""
        try:
            document, token = new_key(tenant, scopes, name, rate_limit_per_minute=rate_limit_per_minute)
        except ValueError as error:
            raise Invalid(str(error), ("body", "scopes")) from None
        # Checked on the parsed scopes (" operator" is "operator"): no escalation by spelling.
        if creator is not None and "operator" in document["scopes"] and not creator.allows("operator"):
            raise Forbidden("only an operator key may create a key with the 'operator' scope")
        await self._keys.insert_one(document)
        return document, token

    async def list(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's key documents, oldest first, without their secrets' hashes."""
        return [key async for key in self._keys.find({"tenant": tenant}, {"secret_hash": 0}).sort("created_at_ms", 1)]

    async def revoke(self, tenant: str, key_id: str) -> None:
        """Revoke a key of the tenant: at once here, within CAIRN_AUTH_CACHE_TTL_S on other
        gateway processes (their caches). Raises `KeyNotFound`."""
        result = await self._keys.update_one({"_id": key_id, "tenant": tenant}, {"$set": {"revoked_at": clock.iso(clock.utcnow())}})
        if result.matched_count == 0:
            raise KeyNotFound(key_id)
        self._verifier.forget(key_id)


def method_scope(method: str) -> str:
    """The scope an HTTP method needs: `read` for GET and HEAD, else `submit`."""
    return "read" if method in ("GET", "HEAD") else "submit"


def check_scope(principal: Principal, scope: str) -> None:
    """Raises `Forbidden` unless the principal's key has `scope` (or one implying it: `IMPLIED`)."""
    if not principal.allows(scope):
        raise Forbidden(f"this API key lacks the {scope!r} scope")
