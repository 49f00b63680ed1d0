"""`http_json`: reads a paged JSON HTTP API into a collection, one record per item of each page.

Paging styles (`paging`):
- `page`: page numbers (`page_param`, from `first_page`), `page_size` sent as `per_page_param`;
- `offset`: record offsets (`offset_param`), `page_size` sent as `limit_param`;
- `cursor`: a next-page token read from the body at `next_cursor_path`, sent back as `cursor_param`;
- `link`: the next page's URL from the `Link: <...>; rel="next"` header.

Work space (how a job shards), the first that the params set:
- `start`/`end` (KeyRange): pages [start, end) (`page`) or record offsets [start, end) (`offset`);
- `since`/`until` (TimeRange): time windows, each sent as query params `since_param`/`until_param`
  and paged to its end in any style;
- `urls` (WorkItems): a list of start URLs, each paged to its end in any style;
- otherwise one shard (Single) paging `url` to its end.

A page or offset run without `end` ends at an empty page, or at a page shorter than
`page_size` (`stop_on_short_page`); a cursor or link run ends when there is no next page.

The cursor (checkpointed after each batch, so a resumed shard refetches at most one batch) is
`{"item": i, "next": n}`: `i` the index of the start URL in the shard's items (0 otherwise), `n`
the next page number or offset, or the next token or URL (None: the item's first page).

Records are the list at `records_path` (dotted; "" for a body that is the list); each record's
identity (its `_id` in the target) is the value at `id_path`. Auth headers come from a named
secret of the worker's settings (`auth_secret` -> CAIRN_SECRETS), never from the job spec. Every
request takes the host's rate limit (`rate_limit`, shared by all workers through Redis). With
`keep_raw`, each page's bytes are kept in GridFS and each record carries `raw_payload_id`.
"""

import ipaddress
import logging
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cairn_contracts.pipelines import HTTP_JSON
from cairn_ingest_worker.http.fetch import FetchPolicy, Page, PageFetcher, build_client, origin
from cairn_ingest_worker.http.ratelimit import host_limiter, parse_rate
from cairn_ingest_worker.http.raw_pages import RawPages
from cairn_sdk import (
    Batch,
    Bounds,
    Cursor,
    FailurePolicy,
    KeyRange,
    NonRetryableError,
    Pipeline,
    RunContext,
    SecretNotAllowed,
    Single,
    TimeRange,
    WorkItems,
)

logger = logging.getLogger(__name__)

URL_PATTERN = r"^https?://[^\s]+$"
PARAM_NAME = r"^[A-Za-z0-9_.\[\]-]{1,64}$"
PATH = r"^[A-Za-z0-9_.-]{0,200}$"  # a dotted JSON path: "data.items", "results", "" (the body)
HEADER_NAME = r"^[A-Za-z0-9-]{1,64}$"
# The `limits` notation: "10/second", "600 per minute", "5/2 seconds".
RATE = r"^\s*\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?\s*$"
# Requests one `read` may make: a batch of tiny (or empty) pages still ends, commits and lets the
# heartbeat see cancels and time bounds.
MAX_PAGES_PER_BATCH = 1000


CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")
# The rules across fields, in the announced JSON Schema too: the gateway checks a job against the
# schema alone (it never imports this module), so they are refused there with a 422, not later.
_SCHEMA_RULES: dict[str, Any] = {
    "anyOf": [
        {"required": ["url"], "properties": {"url": {"type": "string"}}},
        {"required": ["urls"], "properties": {"urls": {"type": "array"}}},
    ],
    "allOf": [
        {
            "if": {"required": ["start"], "properties": {"start": {"type": "integer"}}},
            "then": {"properties": {"paging": {"enum": ["page", "offset"]}}},
        }
    ],
}


class HttpJsonParams(BaseModel):
    """The params of an `http_json` job (validated by the gateway from the announced JSON Schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_SCHEMA_RULES)

    url: str | None = Field(None, pattern=URL_PATTERN, max_length=2000, description="The API's URL (first page; paging params are added)")
    urls: list[Annotated[str, Field(pattern=URL_PATTERN, max_length=2000)]] | None = Field(
        None, min_length=1, max_length=10_000, description="Start URLs, each paged to its end (shards are slices of this list)"
    )
    paging: Literal["page", "offset", "cursor", "link"] = Field("page", description="How the API pages")
    page_size: int = Field(100, ge=1, le=10_000, description="Records asked per page")
    page_param: str = Field("page", pattern=PARAM_NAME)
    per_page_param: str | None = Field("per_page", pattern=PARAM_NAME, description="Query param of page_size (page paging); null: not sent")
    first_page: int = Field(1, ge=0, le=1_000_000, description="Number of the first page")
    offset_param: str = Field("offset", pattern=PARAM_NAME)
    limit_param: str | None = Field("limit", pattern=PARAM_NAME, description="Query param of page_size (offset and cursor paging)")
    cursor_param: str = Field("cursor", pattern=PARAM_NAME)
    next_cursor_path: str = Field("next_cursor", pattern=PATH, description="Where the body holds the next page's token")
    stop_on_short_page: bool = Field(True, description="A page shorter than page_size is the last (page/offset paging)")
    start: int | None = Field(None, ge=0, le=2**53, description="First page (page paging) or offset (offset paging) of the range")
    end: int | None = Field(None, ge=1, le=2**53, description="End (exclusive) of the page or offset range")
    since: datetime | None = Field(None, description="Start of the time range (windows are shards)")
    until: datetime | None = Field(None, description="End (exclusive) of the time range")
    since_param: str = Field("since", pattern=PARAM_NAME)
    until_param: str = Field("until", pattern=PARAM_NAME)
    time_format: Literal["iso", "epoch_s", "epoch_ms"] = Field("iso", description="How window bounds are sent")
    records_path: str = Field("data", pattern=PATH, description="Dotted path of the records list in the body ('' for the body)")
    id_path: str = Field("id", pattern=r"^[A-Za-z0-9_.-]{1,200}$", description="Dotted path of a record's identity")
    query: dict[str, str] = Field(default_factory=dict, max_length=50, description="Extra query params of every request")
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=50,
        description="Extra headers (not secrets: use auth_secret)",
        json_schema_extra={"propertyNames": {"pattern": f"^(?!(?i:{'|'.join(CREDENTIAL_HEADERS)})$)[A-Za-z0-9-]{{1,64}}$"}},
    )
    auth_secret: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name of a worker secret (CAIRN_SECRETS)")
    auth_header: str = Field("Authorization", pattern=HEADER_NAME, description="Header the secret is sent in")
    rate_limit: str | None = Field(None, pattern=RATE, description="Requests per host, shared by all workers, e.g. '10/second'")
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    read_timeout_s: float = Field(30.0, gt=0, le=600)
    max_tries: int = Field(5, ge=1, le=20, description="Requests of one page before the batch fails (the shard retries later)")
    backoff_base_s: float = Field(0.5, ge=0, le=60)
    backoff_max_s: float = Field(30.0, ge=0, le=600)
    max_retry_after_s: float = Field(60.0, ge=0, le=3600, description="A longer Retry-After fails the batch instead of waiting")
    keep_raw: bool = Field(False, description="Keep each raw page in GridFS; records carry raw_payload_id")

    @field_validator("headers")
    @classmethod
    def _headers_are_not_secrets(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if name.lower() in CREDENTIAL_HEADERS:
                raise ValueError(f"header {name} carries credentials: name a worker secret in auth_secret instead")
        return headers

    @model_validator(mode="after")
    def _source_given(self) -> "HttpJsonParams":
        if self.url is None and not self.urls:
            raise ValueError("give url or urls")
        if (self.start is not None or self.end is not None) and self.paging not in ("page", "offset"):
            raise ValueError("start/end ranges need page or offset paging")
        return self

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_tries=self.max_tries,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            max_retry_after_s=self.max_retry_after_s,
        )


class HttpJsonPipeline(Pipeline[HttpJsonParams]):
    """Reads a paged JSON HTTP API (page, offset, next-cursor or Link paging)."""

    name: ClassVar[str] = HTTP_JSON
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "Reads a paged JSON HTTP API: page numbers, offsets, next-cursor tokens or Link headers"
    Params = HttpJsonParams
    space = (KeyRange("start", "end"), TimeRange("since", "until"), WorkItems("urls"), Single())
    # Transient trouble (PageUnavailable, MalformedPage, retryable statuses) is RetryableError or
    # HttpStatusError, classified by the defaults; a page without the records list never heals.
    failures: ClassVar[FailurePolicy] = FailurePolicy()

    def __init__(self, params: HttpJsonParams, context: RunContext) -> None:
        super().__init__(params, context)
        # MissingSecret: dead-lettered. The secret goes only to the hosts the job names: never to
        # another one a page's Link or a redirect points at.
        urls = [*([params.url] if params.url else []), *(params.urls or [])]
        origins = {origin(url) for url in urls}
        # As httpx sends them (ASCII, IDNA 2008): CAIRN_SECRETS hosts are A-labels, and `host`
        # would give `faß.de` for a job spelling it `xn--fa-hia.de`.
        hosts = hosts_of(urls)
        # SecretNotAllowed (dead-lettered) if the secret is bound to other hosts than the job's.
        secret = (params.auth_header, context.secret(params.auth_secret, hosts=hosts)) if params.auth_secret is not None else None
        if secret is not None and params.auth_secret in context.secret_hosts:
            # A secret bound to hosts travels encrypted: plain http only to this machine.
            plain = sorted({host for url in urls if httpx.URL(url).scheme == "http" for host in hosts_of([url]) if not _loopback(host)})
            if plain:
                raise SecretNotAllowed(f"secret {params.auth_secret!r} is bound to hosts and may not go over plain http to {', '.join(plain)}")
        rate = parse_rate(params.rate_limit) if params.rate_limit else None
        limiter = host_limiter(context.redis, context.redis_prefix) if rate is not None else None
        self._client = build_client(
            params.fetch_policy(), params.headers, secret=secret, secret_origins=origins,
            allow_private_networks=context.allow_private_networks,
        )
        self.fetcher = PageFetcher(self._client, params.fetch_policy(), limiter=limiter, rate=rate)
        if params.keep_raw and context.store_db is None:
            raise NonRetryableError("keep_raw needs Cairn's database in the run context")
        self._raw = RawPages(context.store_db) if params.keep_raw and context.store_db is not None else None

    def close(self) -> None:
        """Release the HTTP connections (the runner calls it once when the run ends)."""
        self._client.close()

    # --- cursor ------------------------------------------------------------------------------
    def start(self, bounds: Bounds) -> Cursor:
        return {"item": 0, "next": self._first(bounds)}

    def _first(self, bounds: Bounds) -> int | str | None:
        if self.params.start is not None and self.params.end is not None and bounds.items is None and not self._windowed():
            return bounds.start  # KeyRange: this shard's first page or offset
        if self.params.paging == "page":
            return self.params.first_page
        if self.params.paging == "offset":
            return 0
        return None  # cursor / link: the item's first request carries no token

    def _ranged(self) -> bool:
        return self.params.start is not None and self.params.end is not None

    def _windowed(self) -> bool:
        return not self._ranged() and self.params.since is not None and self.params.until is not None

    # --- reading -----------------------------------------------------------------------------
    def read(self, bounds: Bounds, cursor: Cursor, limit: int) -> Batch:
        """Whole pages from `cursor` until at least `limit` records or the shard's end."""
        state = _state(cursor)
        items = self._items(bounds)
        records: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES_PER_BATCH):
            item, following = state["item"], state["next"]
            if item >= len(items):
                return Batch(records, state, done=True, position=bounds.end)
            page_records, after = self._page(bounds, items[item], following)
            if bounds.bucket is not None:  # a hash-mod shard keeps its bucket's records of every page
                page_records = [r for r in page_records if bounds.holds(self.identity(r))]
            records.extend(page_records)
            state = {"item": item, "next": after} if after is not None else {"item": item + 1, "next": self._first(bounds)}
            if state["item"] >= len(items):
                return Batch(records, state, done=True, position=bounds.end)
            if len(records) >= limit:
                return Batch(records, state, position=self._position(bounds, state))
        return Batch(records, state, position=self._position(bounds, state))

    def _items(self, bounds: Bounds) -> list[str]:
        if bounds.items is not None:
            return [str(url) for url in bounds.items]
        if self.params.url is None:
            raise NonRetryableError("http_json: this work space pages `url`, and the job gives none")
        return [self.params.url]

    def _position(self, bounds: Bounds, state: dict[str, Any]) -> int | None:
        if bounds.items is not None:
            return bounds.start + int(state["item"])
        if self._ranged() and isinstance(state["next"], int):
            return int(state["next"])
        return None

    def _page(self, bounds: Bounds, url: str, following: int | str | None) -> tuple[list[dict[str, Any]], int | str | None]:
        """Fetch one page of `url` at `following`; its records and the next position (None: the
        item is exhausted)."""
        p = self.params
        query: dict[str, str] = dict(p.query)
        if self._windowed():
            since, until = bounds.window()
            query[p.since_param], query[p.until_param] = _moment(since, p.time_format), _moment(until, p.time_format)
        size = p.page_size
        if p.paging == "link":
            page = self.fetcher.get(str(following), None) if following else self.fetcher.get(url, query)
            records = self._records(page)
            if page.next_link is not None and page.next_link in (following, page.url):
                raise NonRetryableError(f"{page.url}: its Link rel=next points at itself: the paging would never end")
            return records, page.next_link
        if p.paging == "cursor":
            if p.limit_param:
                query[p.limit_param] = str(size)
            if following:
                query[p.cursor_param] = str(following)
            page = self.fetcher.get(url, query)
            records = self._records(page)
            token = _at(page.body, p.next_cursor_path)
            if token not in (None, "") and following is not None and str(token) == str(following):
                raise NonRetryableError(f"{page.url}: the next cursor is the one just sent: the paging would never end")
            return records, (str(token) if token not in (None, "") else None)
        position = int(following if following is not None else 0)
        if self._ranged() and position >= bounds.end:
            return [], None
        if p.paging == "offset":
            if self._ranged():
                size = min(size, bounds.end - position)
            query[p.offset_param] = str(position)
            if p.limit_param:
                query[p.limit_param] = str(size)
            step = size
        else:
            query[p.page_param] = str(position)
            if p.per_page_param:
                query[p.per_page_param] = str(size)
            step = 1
        page = self.fetcher.get(url, query)
        records = self._records(page)
        following_position = position + step
        if not records or (p.stop_on_short_page and len(records) < size):
            return records, None
        if self._ranged() and following_position >= bounds.end:
            return records, None
        return records, following_position

    def _records(self, page: Page) -> list[dict[str, Any]]:
        found = _at(page.body, self.params.records_path)
        if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
            # A 2xx JSON answer without the list is the job's records_path not matching the API:
            # fetching again cannot help.
            raise NonRetryableError(f"{page.url}: no list of records at records_path {self.params.records_path!r}")
        if self._raw is not None:
            pid = self._raw.save(page.content, url=page.url, owner=f"job:{self.context.job_id}")
            return [{**record, "raw_payload_id": pid} for record in found]
        return found

    # --- records -----------------------------------------------------------------------------
    def identity(self, record: dict[str, Any]) -> str:
        value = _at(record, self.params.id_path)
        if value is None or isinstance(value, (dict, list)):
            raise NonRetryableError(f"a record has no scalar identity at id_path {self.params.id_path!r}")
        return str(value)


def _state(cursor: Cursor) -> dict[str, Any]:
    if not isinstance(cursor, dict) or "item" not in cursor:
        raise NonRetryableError(f"http_json: unreadable cursor {cursor!r}")
    return {"item": int(cursor["item"]), "next": cursor.get("next")}


def _at(value: Any, path: str) -> Any:
    """The value at a dotted path of a JSON value ("" is the value itself; list indices allowed)."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _moment(moment: datetime, fmt: str) -> str:
    if fmt == "epoch_s":
        return str(int(moment.timestamp()))
    if fmt == "epoch_ms":
        return str(int(moment.timestamp() * 1000))
    return moment.isoformat().replace("+00:00", "Z")


def hosts_of(urls: list[str]) -> set[str]:
    """The hosts of `urls` as httpx sends them (ASCII, IDNA 2008)."""
    return {httpx.URL(url).raw_host.decode("ascii") for url in urls}


def _loopback(host: str) -> bool:
    """`localhost` or a loopback address literal."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
