"""The Pipeline base class and what the runner hands it: bounds, cursor, batch, run context.

A pipeline reads its shard's share of the work space batch by batch from a cursor it owns:

    cursor = pipeline.start(bounds)                      # a fresh shard (no checkpoint yet)
    while True:
        batch = pipeline.read(bounds, cursor, limit)     # up to `limit` records
        records = [clean(r) ...] (None dropped), each stored with _id = identity(record)
        checkpoint(batch.cursor, batch.position)         # committed with the stored batch
        if batch.done: break                             # the shard is finished
        cursor = batch.cursor
    pipeline.close()                                     # always, when the run ends

After a crash the run resumes at the last committed cursor, so a batch may be read twice: the
sink keeps records idempotent by their identity.
"""

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

from pydantic import BaseModel
from pymongo.database import Database

from cairn_sdk.effects import Effects, LocalEffects
from cairn_sdk.errors import FailurePolicy, NonRetryableError
from cairn_sdk.space import Single, Space, describe, from_epoch_ms

# A cursor is any JSON value: opaque to Cairn, owned by the pipeline (an int, a timestamp, a page
# token, a [timestamp, id] pair...). It is stored in the checkpoint after each committed batch.
Cursor: TypeAlias = None | bool | int | float | str | list[Any] | dict[str, Any]


def stable_hash(key: str | int) -> int:
    """The hash that assigns a record key to a hash-mod bucket, the same in every process.
    (Equal to cairn_contracts.partitioning.stable_hash; the SDK does not import Cairn.)"""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Bucket:
    """A hash-mod shard's share of the keys: those with stable_hash(key) % modulus == remainder."""

    modulus: int
    remainder: int

    def holds(self, key: str | int) -> bool:
        return stable_hash(key) % self.modulus == self.remainder


@dataclass(frozen=True)
class Bounds:
    """One shard's part of the work space: the half-open interval [start, end) in space units
    (integer keys; epoch ms for a TimeRange; list indices for WorkItems; [0, 1) for Single).

    `bucket`: set for a hash-mod shard (it scans the whole interval and keeps its bucket's keys).
    `items`: for a WorkItems space, the shard's slice of the list param (items[start:end]).
    """

    start: int
    end: int
    bucket: Bucket | None = None
    items: tuple[Any, ...] | None = None

    def window(self) -> tuple[datetime, datetime]:
        """The shard's time window [since, until) as UTC datetimes (TimeRange spaces)."""
        return from_epoch_ms(self.start), from_epoch_ms(self.end)

    def holds(self, key: str | int) -> bool:
        """Whether a record key belongs to this shard's bucket (always, without a bucket)."""
        return self.bucket is None or self.bucket.holds(key)


@dataclass(frozen=True)
class Batch:
    """What one `read` returns.

    `records`: the raw records read (cleaned and stored by the runner). `cursor`: where the next
    read starts (JSON). `done`: the shard is finished once this batch is stored. `position`:
    optional progress inside [start, end) in space units, for a job's percent done.

    Raises NonRetryableError (a pipeline bug: reading again returns the same) when `cursor` is not
    a JSON value that reads back equal (no tuple, datetime, set, NaN, non-text key), is over
    MAX_CURSOR_BYTES of JSON text or has an integer beyond 64 bits (what the checkpoint stores),
    or `position` is not an int: refused before the batch is stored, never at its commit.
    """

    records: list[dict[str, Any]]
    cursor: Cursor
    done: bool = False
    position: int | None = None

    def __post_init__(self) -> None:
        try:
            text = json.dumps(self.cursor, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise NonRetryableError(f"the batch's cursor is not a JSON value: {error}") from None
        if json.loads(text) != self.cursor or _has_wide_int(self.cursor):
            raise NonRetryableError(f"the batch's cursor does not read back as it is from JSON and the checkpoint: {text[:200]}")
        if len(text) > MAX_CURSOR_BYTES:
            raise NonRetryableError(f"the batch's cursor is {len(text)} bytes of JSON: a cursor is a position, at most {MAX_CURSOR_BYTES}")
        if self.position is not None and (not isinstance(self.position, int) or isinstance(self.position, bool)):
            raise NonRetryableError(f"the batch's position must be an int or None, not {self.position!r}")


# The largest cursor (as JSON text) a checkpoint keeps: a page token or a key, not data.
MAX_CURSOR_BYTES = 64 * 1024


def _has_wide_int(value: Any) -> bool:
    """Whether a JSON value holds an integer MongoDB cannot store (beyond a signed 64-bit one)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**63
    if isinstance(value, list):
        return any(_has_wide_int(item) for item in value)
    if isinstance(value, dict):
        return any(_has_wide_int(item) for item in value.values())
    return False


class MissingSecret(NonRetryableError):
    """The pipeline asked for a secret the worker's settings do not hold (the shard is dead-lettered)."""


class SecretNotAllowed(NonRetryableError):
    """The secret is bound to hosts (CAIRN_SECRETS `hosts`) and the job would send it elsewhere,
    or bound to tenants (`tenants`) and the job is another tenant's."""


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """`host` equals a pattern, or a `*.example.com` pattern covers it (any depth below, not the
    apex). Case-insensitive."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


@dataclass(frozen=True)
class RunContext:
    """What one shard run of a pipeline may use.

    `attempt`: 1 for the first run of the shard, +1 per claim. `source_db`: the job's tenant's
    namespace database (pymongo), where its own sources are. `store_db`: the same tenant
    namespace, for what a pipeline keeps besides records (GridFS raw pages; never write records
    there yourself: the runner stores them). Neither is ever Cairn's control database.
    `granted`: `(database, collection) -> Database`, the worker's check of a source an operator
    granted to the tenant outside its namespace (raises NonRetryableError if not granted; None:
    no granted sources); call it through `source(database, collection)`. `redis`: the worker's
    Redis client (None if not configured) and `redis_prefix` the prefix its keys must carry.
    `effects`: the side-effect ledger (the worker's TaskDedup collection; an in-memory one by
    default, for unit tests).
    """

    attempt: int = 1
    job_id: str = ""
    shard_key: str = ""
    tenant: str = "default"
    source_db: Database | None = None
    redis: Any = None
    effects: Effects | None = field(default_factory=LocalEffects)  # in memory outside the worker (unit tests)
    store_db: Database | None = None
    redis_prefix: str = "cairn"
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # never logged
    # name -> host patterns a secret may be sent to ("api.example.com", "*.example.com"); a
    # secret absent here may go to any host (the worker's operator chose so).
    secret_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # name -> the tenants whose jobs may use a secret; a secret absent here serves every tenant.
    secret_tenants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Outbound HTTP to loopback/private/link-local addresses (cairn_runtime.egress): off unless
    # the worker allows it (CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS).
    allow_private_networks: bool = False
    granted: Callable[[str, str], Database] | None = None

    def secret(self, name: str, *, hosts: Iterable[str] = ()) -> str:
        """The worker's secret `name` (a key of its CAIRN_SECRETS JSON object), to be sent to
        every host in `hosts` (lower-case ASCII host names as sent: IDNA A-labels). Raises MissingSecret if unset, and
        SecretNotAllowed if the secret is bound to hosts and one of `hosts` is not among them, or
        bound to tenants and this run's `tenant` is not among them."""
        try:
            value = self.secrets[name]
        except KeyError:
            raise MissingSecret(f"secret {name!r} is not configured on this worker") from None
        tenants = self.secret_tenants.get(name)
        if tenants is not None and self.tenant not in tenants:
            raise SecretNotAllowed(f"secret {name!r} is not available to tenant {self.tenant!r}")
        allowed = self.secret_hosts.get(name)
        if allowed is not None:
            refused = sorted(host for host in hosts if not host_matches(host, allowed))
            if refused:
                raise SecretNotAllowed(f"secret {name!r} may not be sent to {', '.join(refused)}")
        return value

    def source(self, database: str | None = None, collection: str | None = None) -> Database:
        """The database to read `collection` from: `source_db` (the tenant's namespace) when
        `database` is None, else `database` if it is granted to the tenant for `collection`.
        Raises NonRetryableError: no source database, or `database` not granted (checked at
        every run, so a revoked grant stops the next run)."""
        if database is not None:
            if self.granted is None:
                raise NonRetryableError(f"source database {database!r} is not granted (this worker grants none)")
            return self.granted(database, collection or "")
        if self.source_db is None:
            raise NonRetryableError("this worker has no source database")
        return self.source_db


P = TypeVar("P", bound=BaseModel)


class Pipeline(ABC, Generic[P]):
    """Base class of a pipeline. Subclasses set the class attributes and implement `read`.

    - `name`: the name jobs use (also the entry point name); `version`, `description`: announced.
    - `Params`: the pydantic model of the job's params; its JSON Schema is announced, and the
      gateway validates every job against it.
    - `space`: a descriptor (KeyRange, TimeRange, WorkItems, Single) or a tuple of them.
    - `failures`: the FailurePolicy.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]]
    space: ClassVar[Space | tuple[Space, ...]] = Single()
    failures: ClassVar[FailurePolicy] = FailurePolicy()

    def __init__(self, params: P, context: RunContext) -> None:
        self.params = params
        self.context = context

    def start(self, bounds: Bounds) -> Cursor:
        """The cursor of a fresh shard (no batch committed yet). Default: `bounds.start`."""
        return bounds.start

    @abstractmethod
    def read(self, bounds: Bounds, cursor: Cursor, limit: int) -> Batch:
        """Up to `limit` records from `cursor`, and the cursor after them; `done` when finished."""

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as it is to be stored, or None to drop it. Default: unchanged."""
        return record

    def identity(self, record: dict[str, Any]) -> str:
        """The record's business key, stored as its `_id`. Default: str(record["_id"])."""
        return str(record["_id"])

    def close(self) -> None:
        """Free what this run holds (an HTTP client, a file). The runner calls it once when the
        run ends, whatever its outcome (success, failure, lost lease, hand-off). Default: nothing."""

    @classmethod
    def catalog_entry(cls) -> dict[str, Any]:
        """What the worker announces: name, version, description, params JSON Schema, space."""
        return {
            "name": cls.name,
            "version": cls.version,
            "description": cls.description or (cls.__doc__ or "").strip().split("\n")[0],
            "params_schema": cls.Params.model_json_schema(),
            "space": describe(cls.space),
        }
