"""The gateway's HTTP API as the CLI uses it: one `httpx.Client`, JSON in and out, errors as
`ApiError` carrying the gateway's Problem body (`title`, `detail`, `status`)."""

from typing import Any

import httpx

from cairn_cli.config import Config


class ApiError(Exception):
    """The gateway answered an error (4xx/5xx), or could not be reached (`status` 0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _problem_message(response: httpx.Response) -> tuple[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}", None
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):  # a validation error: name each field
            detail = "; ".join(
                f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}" for item in detail if isinstance(item, dict)
            )
        return f"HTTP {response.status_code} {body.get('title') or ''}: {detail}".strip(), body
    return f"HTTP {response.status_code}", body


class CairnClient:
    """A client of one gateway. `transport` is for tests only (httpx's mock transports are not
    used by Cairn's own tests, which talk to a real gateway)."""

    def __init__(self, config: Config, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        headers["User-Agent"] = "cairn-cli"
        self._http = httpx.Client(base_url=config.url, headers=headers, timeout=config.timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CairnClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON answer (None for 204). Raises `ApiError`."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, json=json, params=query, headers=headers)
        except httpx.HTTPError as error:
            raise ApiError(0, f"cannot reach the gateway at {self._http.base_url}: {error}") from error
        if response.status_code >= 400:
            message, body = _problem_message(response)
            raise ApiError(response.status_code, message, body)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.call("POST", path, json=json, headers=headers)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)
