"""Copies documents of a MongoDB collection, by integer key range or by time window.

Two work spaces, the first whose params are set applies:

- `KeyRange(start, end)`: documents whose integer `key_field` lies in [start, end); the cursor is
  the next key (an int), in key order.
- `TimeRange(since, until)`: documents whose datetime `time_field` lies in [since, until), cut
  into time-window shards; the cursor is the pair `[epoch_ms, id]` of the last document stored,
  in (time_field, _id) order, so documents sharing a timestamp are neither skipped nor repeated
  across batches. A fresh shard starts at `null` (the window's beginning).

A source collection that does not exist is a permanent failure (`SourceNotFound`), never an empty
source: MongoDB answers a read of a missing collection with no documents, which would end the job
SUCCESS with nothing copied. An existing but empty collection (or range) is a real, empty result.
"""

from datetime import datetime
from typing import Annotated, Any

from bson import ObjectId
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymongo.errors import CursorNotFound, ExecutionTimeout, OperationFailure, WriteConcernError

from cairn_contracts.bounds import Moment
from cairn_contracts.namespaces import JobCollection
from cairn_contracts.pipelines import MONGO_RANGE
from cairn_contracts.tenancy import DatabaseName
from cairn_sdk import Batch, Bounds, Cursor, FailurePolicy, KeyRange, NonRetryableError, Pipeline, TimeRange, epoch_ms, from_epoch_ms

# Keys are stored as MongoDB 64-bit integers (see synthetic.MAX_KEY).
MAX_KEY = 2**62
# A document field path: no `$` operator, no NUL (MongoDB refuses both in projections).
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$"


class SourceNotFound(NonRetryableError):
    """The job names a source collection that does not exist: the shard is dead-lettered."""


class MongoRangeParams(BaseModel):
    """Copies documents of a source collection: integer keys [start, end) or times [since, until)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    collection: JobCollection = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,120}$", description="Source collection; none of Cairn's own")
    database: DatabaseName | None = Field(
        None, description="A source database an operator granted to the tenant for this collection (default: the tenant's own namespace)"
    )
    key_field: str = Field("_id", pattern=FIELD_NAME, description="Integer key field (key ranges)")
    start: int | None = Field(None, ge=-MAX_KEY, le=MAX_KEY, description="First key (with end)")
    end: int | None = Field(None, ge=-MAX_KEY, le=MAX_KEY, description="Exclusive end key (with start)")
    time_field: str = Field("created_at", pattern=FIELD_NAME, description="Datetime field (time windows)")
    since: Moment | None = Field(None, description="Window start, ISO 8601 (with until); naive means UTC")
    until: Moment | None = Field(None, description="Exclusive window end (with since)")
    fields: list[Annotated[str, Field(pattern=FIELD_NAME)]] | None = Field(None, max_length=100, description="Fields to copy (all if unset)")

    @model_validator(mode="after")
    def _one_space(self) -> "MongoRangeParams":
        if self.start is not None and self.end is not None:
            if self.end <= self.start:
                raise ValueError("end must be greater than start")
        elif self.since is not None and self.until is not None:
            if self.until <= self.since:
                raise ValueError("until must be later than since")
        else:
            raise ValueError("give start and end (a key range) or since and until (a time window)")
        return self

    @property
    def by_time(self) -> bool:
        return self.start is None or self.end is None


def collection_exists(source: Any, name: str) -> bool:
    """Whether `name` is a collection (or view) of the `source` database (listCollections)."""
    # The filter keeps MongoDB's answer to one name; the membership test keeps the answer right
    # where a server ignores the filter (the nx-27017 stand-in lists every collection).
    return name in source.list_collection_names(filter={"name": name})


class MongoRangePipeline(Pipeline[MongoRangeParams]):
    """Copies a MongoDB collection's documents by integer key range or datetime window."""

    name = MONGO_RANGE
    version = "3"
    description = "Copies documents of a MongoDB collection by integer key range [start, end) or time window [since, until)"
    Params = MongoRangeParams
    space = (KeyRange("start", "end"), TimeRange("since", "until"))
    # A query the server refuses (bad projection, not authorised, ...) is refused again next
    # time; its timeouts, a lost cursor and a write-concern hiccup are worth another try.
    failures = FailurePolicy(
        retryable=(ExecutionTimeout, CursorNotFound, WriteConcernError),
        non_retryable=(OperationFailure,),
    )

    def __init__(self, params: MongoRangeParams, context: Any) -> None:
        super().__init__(params, context)
        # The tenant's namespace, or a granted database (checked again at every run: RunContext).
        self._collection = context.source(params.database, params.collection)[params.collection]
        order_field = params.time_field if params.by_time else params.key_field
        self._projection = {name: 1 for name in {*params.fields, order_field, "_id"}} if params.fields else None
        self._source_found = False

    def start(self, bounds: Bounds) -> Cursor:
        return None if self.params.by_time else bounds.start

    def read(self, bounds: Bounds, cursor: Cursor, limit: int) -> Batch:
        if not self._source_found:
            # Checked at the first read of each run, not at construction: an outage of the source
            # store then surfaces where the runner handles store errors.
            if not collection_exists(self._collection.database, self.params.collection):
                raise SourceNotFound(
                    f"source collection {self.params.collection!r} does not exist in database "
                    f"{self._collection.database.name!r}"
                )
            self._source_found = True
        if self.params.by_time:
            return self._read_window(bounds, cursor, limit)
        return self._read_keys(bounds, int(cursor), limit)  # type: ignore[arg-type]

    def _read_keys(self, bounds: Bounds, cursor: int, limit: int) -> Batch:
        key = self.params.key_field
        documents = list(self._collection.find({key: {"$gte": cursor, "$lt": bounds.end}}, self._projection).sort(key, 1).limit(limit))
        exhausted = len(documents) < limit
        next_cursor = bounds.end if exhausted or not documents else int(_field(documents[-1], key)) + 1
        # A hash-mod bucket's records of this window; the scan is shared cost of hash-mod sharding.
        documents = [d for d in documents if bounds.holds(_field(d, key))]
        return Batch(documents, next_cursor, done=next_cursor >= bounds.end, position=next_cursor)

    def _read_window(self, bounds: Bounds, cursor: Cursor, limit: int) -> Batch:
        field = self.params.time_field
        since, until = bounds.window()
        if cursor is None:
            query: dict[str, Any] = {field: {"$gte": since, "$lt": until}}
        else:
            if not (isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[0], int)):
                raise NonRetryableError(f"not a time-window cursor: {cursor!r}")
            after_ms, after_id = cursor
            after = from_epoch_ms(after_ms)
            # Strictly after the last (time, _id) stored: later times, or the same time and a larger _id.
            query = {"$or": [{field: {"$gt": after, "$lt": until}}, {field: after, "_id": {"$gt": _decode_id(after_id)}}]}
        documents = list(self._collection.find(query, self._projection).sort([(field, 1), ("_id", 1)]).limit(limit))
        if len(documents) < limit:
            done, next_cursor, position = True, cursor, bounds.end
        else:
            last = documents[-1]
            moment = _field(last, field)
            if not isinstance(moment, datetime):
                raise NonRetryableError(f"{field} of document {last['_id']!r} is not a datetime")
            position = epoch_ms(moment)
            done, next_cursor = False, [position, _encode_id(last["_id"])]
        documents = [d for d in documents if bounds.holds(str(d["_id"]))]
        return Batch(documents, next_cursor, done=done, position=position)

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        if self.params.by_time:
            cleaned = {name: value for name, value in record.items() if name != "_id"}
            cleaned["_id"] = f"{self.params.collection}:{record['_id']}"
            cleaned["source_id"] = record["_id"]
            return cleaned
        key = _field(record, self.params.key_field)
        if not isinstance(key, int) or isinstance(key, bool):
            return None
        cleaned = {name: value for name, value in record.items() if name != "_id"}
        cleaned["_id"] = f"{self.params.collection}:{key}"
        cleaned["source_key"] = key
        return cleaned


def _encode_id(value: Any) -> Any:
    """A document _id as JSON for the cursor (an ObjectId as {"oid": hex})."""
    if isinstance(value, ObjectId):
        return {"oid": str(value)}
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    raise NonRetryableError(f"time-window cursors need _id values that are strings, numbers or ObjectIds, not {type(value).__name__}")


def _decode_id(value: Any) -> Any:
    return ObjectId(value["oid"]) if isinstance(value, dict) and "oid" in value else value


def _field(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
