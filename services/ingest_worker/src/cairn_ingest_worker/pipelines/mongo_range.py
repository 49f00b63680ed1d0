"""Copies documents of a MongoDB collection whose integer key lies in the shard's range.

A source collection that does not exist is a permanent failure (`SourceNotFound`), never an empty
source: MongoDB answers a read of a missing collection with no documents, which would end the job
SUCCESS with nothing copied. An existing but empty collection (or key range) is a real, empty
result.
"""

from typing import Any, ClassVar

from pymongo.database import Database
from pymongo.errors import CursorNotFound, ExecutionTimeout, OperationFailure, WriteConcernError

from cairn_contracts.pipelines import MongoRangeParams
from cairn_ingest_worker.errors import FailurePolicy, NonRetryableError
from cairn_ingest_worker.pipelines.base import Batch, Bucket


class SourceNotFound(NonRetryableError):
    """The job names a source collection that does not exist: the shard is dead-lettered."""


def collection_exists(source: Database, name: str) -> bool:
    """Whether `name` is a collection (or view) of the `source` database (listCollections)."""
    # The filter keeps MongoDB's answer to one name; the membership test keeps the answer right
    # where a server ignores the filter (the nx-27017 stand-in lists every collection).
    return name in source.list_collection_names(filter={"name": name})


class MongoRangePipeline:
    # A query the server refuses (bad projection, not authorised, ...) is refused again next
    # time; its timeouts, a lost cursor and a write-concern hiccup are worth another try.
    failures: ClassVar[FailurePolicy] = FailurePolicy(
        retryable=(ExecutionTimeout, CursorNotFound, WriteConcernError),
        non_retryable=(OperationFailure,),
    )

    @classmethod
    def from_job(cls, params: dict[str, Any], *, attempt: int, source: Database, bucket: Bucket | None) -> "MongoRangePipeline":
        return cls(MongoRangeParams.model_validate(params), source, bucket)

    def __init__(self, params: MongoRangeParams, source: Database, bucket: Bucket | None = None) -> None:
        self._params = params
        self._bucket = bucket
        self._collection = source[params.collection]
        self._projection = {name: 1 for name in {*params.fields, params.key_field}} if params.fields else None
        self._source_found = False

    def read(self, cursor: int, end: int, limit: int) -> Batch:
        if not self._source_found:
            # Checked at the first read of each run, not at construction: an outage of the source
            # store then surfaces where the runner handles store errors.
            if not collection_exists(self._collection.database, self._params.collection):
                raise SourceNotFound(
                    f"source collection {self._params.collection!r} does not exist in database "
                    f"{self._collection.database.name!r}"
                )
            self._source_found = True
        key = self._params.key_field
        documents = list(
            self._collection.find({key: {"$gte": cursor, "$lt": end}}, self._projection)
            .sort(key, 1)
            .limit(limit)
        )
        exhausted = len(documents) < limit
        next_cursor = end if exhausted or not documents else int(_field(documents[-1], key)) + 1
        if self._bucket is not None:
            # The bucket's records of this window; the scan is shared cost of hash-mod sharding.
            documents = [d for d in documents if self._bucket.holds(_field(d, key))]
        return Batch(documents, next_cursor)

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        key = _field(record, self._params.key_field)
        if not isinstance(key, int) or isinstance(key, bool):
            return None
        cleaned = {name: value for name, value in record.items() if name != "_id"}
        cleaned["_id"] = f"{self._params.collection}:{key}"
        cleaned["source_key"] = key
        return cleaned


def _field(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
