"""A real paged JSON HTTP API on 127.0.0.1 for the tests of the `http_json` pipeline (and its bench).

Deterministic data: record `i` (0 <= i < total) is the same on every run until a test changes it
(`PagedApi.change`). Four paging styles over the same records, each on its own path:

- `GET /pages?page=N&per_page=K` (page numbers from 1): `{"data": {"items": [...]}, "meta": {"page", "total_pages"}}`
- `GET /offsets?offset=O&limit=K`: `{"data": {"items": [...]}, "total": n}`
- `GET /cursor?cursor=T&limit=K` (no `cursor` for the first page): `{"data": {"items": [...]}, "next_cursor": T | null}`
- `GET /link?page=N&per_page=K`: `{"data": {"items": [...]}}` and `Link: <absolute url>; rel="next"` unless last

Every path also filters before paging: `since`/`until` (ISO 8601, [since, until) on `created_at`)
and `from`/`to` (`seq` in [from, to)). With `token` set, a request without
`Authorization: Bearer <token>` gets 401.

Faults are injected by the test (`inject`), keyed by the offset of a record the request's page
holds, each for a number of requests: an error status (with `Retry-After`), a delay (past the
client's read timeout: a timeout), or a malformed body. `hits` counts the requests per (path,
first offset) and `served` lists every answer's (path, offset, status), so tests can check that
retries happened. It is a plain threaded server of the standard library, not a mock: the client
under test talks HTTP to it over a real socket.
"""

import argparse
import base64
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

logger = logging.getLogger(__name__)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
FaultKind = Literal["status", "delay", "malformed"]
PATHS = ("/pages", "/offsets", "/cursor", "/link")


@dataclass
class Fault:
    """One injected fault: `kind` for the next `times` requests whose page holds record `at`."""

    at: int
    kind: FaultKind
    times: int = 1
    status: int = 500
    retry_after: str | None = None  # the Retry-After header value (seconds or an HTTP date)
    delay_s: float = 0.0
    path: str | None = None  # only this path (all paths if None)


@dataclass
class PagedApi:
    """The data and the injected faults; thread-safe (the server answers on many threads).

    `total`: records 0..total-1; `step_s`: seconds between two records' `created_at` (from EPOCH);
    `default_page_size`: used when a request names none; `token`: the bearer token required (None:
    none); `latency_s`: seconds added to every answer.
    """

    total: int = 1000
    default_page_size: int = 50
    step_s: int = 60
    token: str | None = None
    latency_s: float = 0.0  # added to every answer: a job takes long enough to be interrupted
    versions: dict[int, int] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    hits: Counter[tuple[str, int]] = field(default_factory=Counter)
    served: list[tuple[str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- data --------------------------------------------------------------------------------
    def created_at(self, index: int) -> datetime:
        return EPOCH + timedelta(seconds=index * self.step_s)

    def record(self, index: int) -> dict[str, Any]:
        """Record `index` as the API serves it now (its `version` grows with each change)."""
        version = self.versions.get(index, 1)
        digest = hashlib.blake2b(f"{index}:{version}".encode(), digest_size=6).hexdigest()
        return {
            "id": f"rec-{index:06d}",
            "seq": index,
            "name": f"record {index}" + (f" (v{version})" if version > 1 else ""),
            "value": int(digest, 16) % 100_000,
            "version": version,
            "created_at": self.created_at(index).isoformat().replace("+00:00", "Z"),
            "tags": ["even" if index % 2 == 0 else "odd"],
        }

    def change(self, indices: list[int]) -> None:
        """Change these records (a new version, a new name and value), as a source does."""
        with self.lock:
            for index in indices:
                self.versions[index] = self.versions.get(index, 1) + 1

    def inject(self, at: int, kind: FaultKind, times: int = 1, **options: Any) -> Fault:
        """Fail the next `times` requests whose page holds record `at` (see `Fault`)."""
        fault = Fault(at=at, kind=kind, times=times, **options)
        with self.lock:
            self.faults.append(fault)
        return fault

    def pending_faults(self) -> int:
        """How many injected fault answers have not been served yet."""
        with self.lock:
            return sum(f.times for f in self.faults)

    # --- answering ---------------------------------------------------------------------------
    def selected(self, query: dict[str, str]) -> list[int]:
        """The record indices a request's filters select, in order."""
        low, high = int(query.get("from", 0)), int(query.get("to", self.total))
        indices = range(max(0, low), min(self.total, high))
        since, until = query.get("since"), query.get("until")
        if since is None and until is None:
            return list(indices)
        lo = _moment(since) if since else None
        hi = _moment(until) if until else None
        return [i for i in indices if (lo is None or self.created_at(i) >= lo) and (hi is None or self.created_at(i) < hi)]

    def take_fault(self, path: str, offset: int, size: int) -> Fault | None:
        with self.lock:
            self.hits[(path, offset)] += 1
            for fault in self.faults:
                if fault.times > 0 and offset <= fault.at < offset + max(size, 1) and fault.path in (None, path):
                    fault.times -= 1
                    return fault
        return None

    def note(self, path: str, offset: int, status: int) -> None:
        with self.lock:
            self.served.append((path, offset, status))


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> int:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    if not raw.startswith("o:"):
        raise ValueError("not a cursor of this API")
    return int(raw[2:])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real APIs: the client's connection pool is exercised
    server: "PagedServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        logger.debug("paged server: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        api = self.server.api
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if parts.path not in PATHS:
            self._json(404, {"error": f"no such path {parts.path}"})
            return
        if api.token is not None and self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, {"error": "missing or wrong bearer token"})
            return
        try:
            offset, size = self._window(parts.path, query, api)
        except ValueError as error:
            self._json(400, {"error": str(error)})
            return
        fault = api.take_fault(parts.path, offset, size)
        if fault is not None and self._fault(fault, parts.path, offset):
            return
        if api.latency_s:
            time.sleep(api.latency_s)
        selected = api.selected(query)
        page = selected[offset : offset + size]
        body: dict[str, Any] = {"data": {"items": [api.record(i) for i in page]}}
        headers: dict[str, str] = {}
        more = offset + size < len(selected)
        if parts.path == "/pages":
            body["meta"] = {"page": int(query.get("page", 1)), "total_pages": -(-len(selected) // size)}
        elif parts.path == "/offsets":
            body["total"] = len(selected)
        elif parts.path == "/cursor":
            body["next_cursor"] = encode_cursor(offset + size) if more else None
        elif more:  # /link
            host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
            following = {**query, "page": str(int(query.get("page", 1)) + 1), "per_page": str(size)}
            headers["Link"] = f'<http://{host}/link?{urlencode(following)}>; rel="next"'
        api.note(parts.path, offset, 200)
        self._json(200, body, headers)

    def _window(self, path: str, query: dict[str, str], api: PagedApi) -> tuple[int, int]:
        if path == "/offsets":
            return int(query.get("offset", 0)), int(query.get("limit", api.default_page_size))
        if path == "/cursor":
            token = query.get("cursor")
            return (decode_cursor(token) if token else 0), int(query.get("limit", api.default_page_size))
        size = int(query.get("per_page", api.default_page_size))
        page = int(query.get("page", 1))
        if page < 1 or size < 1:
            raise ValueError("page and per_page start at 1")
        return (page - 1) * size, size

    def _fault(self, fault: Fault, path: str, offset: int) -> bool:
        """Answer with the fault; False if the request is to be answered normally after it."""
        if fault.kind == "delay":
            time.sleep(fault.delay_s)  # the client has given up by now (read timeout)
            return False
        if fault.kind == "malformed":
            api = self.server.api
            api.note(path, offset, 200)
            self._raw(200, b'{"data": {"items": [{"id": "rec-', {"Content-Type": "application/json"})
            return True
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        self.server.api.note(path, offset, fault.status)
        self._json(fault.status, {"error": f"injected {fault.status}"}, headers)
        return True

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._raw(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _raw(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and went away
            self.close_connection = True


class PagedServer(ThreadingHTTPServer):
    """The HTTP server of a `PagedApi`, on 127.0.0.1 (port 0: a free one), run on a daemon thread."""

    daemon_threads = True
    block_on_close = False  # a delayed answer must not hold up the test's teardown

    def __init__(self, api: PagedApi, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.api = api
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or was SIGKILLed resets its connection: expected in these tests.
        logger.debug("paged server: a client of %s went away", client_address, exc_info=True)

    def start(self) -> "PagedServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="paged-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "PagedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """`python -m cairn_testkit.paged_server --total 10000 --port 8099`: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--total", type=int, default=10_000)
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    server = PagedServer(PagedApi(total=args.total, default_page_size=args.page_size, token=args.token), args.port)
    logging.basicConfig(level=logging.INFO)
    logger.info("paged test API on %s", server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
