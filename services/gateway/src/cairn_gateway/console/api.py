"""The console's only way to the data: the gateway's own public HTTP API, called in-process.

Every fragment the console renders is built from answers of the JSON API (`/v1/jobs`, `/dlq/...`,
`/v1/schedules`, `/v1/workers`) requested with the browser's own `Authorization` header, through
an `httpx.ASGITransport` on the same app: the same authentication, scopes, rate limit, validation
and error bodies as any client, and no privilege of its own (docs/design.md, "The web console").
"""

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

logger = logging.getLogger(__name__)

# Not a host anyone reaches: requests never leave the process.
INTERNAL_BASE_URL = "http://gateway.internal"


@dataclass(frozen=True)
class ApiAnswer:
    """One answer of the public API: its status and JSON body (None when it had none)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def detail(self) -> str:
        """The problem's detail as one line: field errors as `loc.path: message`, joined by `; `."""
        if not isinstance(self.body, dict):
            return f"HTTP {self.status}"
        detail = self.body.get("detail")
        if isinstance(detail, list):
            parts = []
            for error in detail:
                if isinstance(error, dict):
                    loc = ".".join(str(part) for part in error.get("loc") or [])
                    parts.append(f"{loc}: {error.get('msg', '')}" if loc else str(error.get("msg", "")))
            return "; ".join(parts) or f"HTTP {self.status}"
        return str(detail) if detail else str(self.body.get("title") or f"HTTP {self.status}")


class GatewayApi:
    """A client of the gateway's public API for one browser request.

    `authorization` is the browser's `Authorization` header, passed on as is (None: none sent, so
    the API answers 401). Methods return `ApiAnswer` and never raise on an HTTP error status.
    """

    def __init__(self, client: httpx.AsyncClient, authorization: str | None) -> None:
        self.client = client
        self.headers = {"Authorization": authorization} if authorization else {}

    async def get(self, path: str, params: dict[str, Any] | None = None) -> ApiAnswer:
        """GET `path` (e.g. "/v1/jobs"); None-valued params are left out."""
        query = {name: value for name, value in (params or {}).items() if value not in (None, "")}
        return await self._send("GET", path, params=query)

    async def post(self, path: str, body: Any = None) -> ApiAnswer:
        """POST `path` with `body` as JSON (no body when None)."""
        return await self._send("POST", path, json=body)

    async def post_json_text(self, path: str, text: str) -> ApiAnswer:
        """POST `path` with `text`, JSON as the user wrote it, passed on unparsed: the API names
        what it refuses (a lone surrogate `\\ud800`, NaN...), where re-encoding parsed JSON
        would fail in this process and answer 500."""
        content = text.encode("utf-8", "surrogatepass")  # bytes the API refuses as not UTF-8, if any
        return await self._send("POST", path, content=content, headers={"Content-Type": "application/json"})

    async def _send(self, method: str, path: str, **kwargs: Any) -> ApiAnswer:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = await self.client.request(method, path, headers=headers, **kwargs)
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        return ApiAnswer(response.status_code, body)


def internal_client(app: FastAPI) -> httpx.AsyncClient:
    """An httpx client whose requests go straight into `app` (its middlewares and routes), not to
    the network. One per app; closed with it."""
    # Bounded: a fragment waits at most this for the API (worker control waits on remote control).
    # raise_app_exceptions=False: an API bug is the API's 500 answer, rendered like any error,
    # not an exception tearing down the fragment.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=INTERNAL_BASE_URL, timeout=30.0)
