"""Large raw payloads in GridFS, with a RawPayload metadata document in `raw_payloads`.

The DLQ handler keeps an original message body over its threshold out of task_errors: the bytes
go to the GridFS bucket `raw_payload_blobs` under a deterministic id, the `raw_payloads` document
describes them (size, sha256, encoding, owner), and the task_errors entry carries only a pointer.
The gateway reads them back for `GET /dlq/entries/{id}/payload`.

Saving is idempotent and crash-safe without transactions: every upload goes to a GridFS file of
its own (`<payload id>:<random>`), and the metadata document, inserted under the payload's
deterministic id once the upload completed, names the one that counts. Its presence means the
bytes are all there; a second saver (a redelivery) that loses the insert deletes its own copy.
What a crash leaves (a partial upload, or a complete one whose metadata was never inserted) is
unreferenced and harmless: it is never read, and never collides with a later upload (the
MongoDB stand-in cannot delete a GridFS file that has no files document, so nothing relies on
cleaning it up; see docs/mongodb-stand-in.md).
"""

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.store import RAW_PAYLOAD_BUCKET, RAW_PAYLOADS

logger = logging.getLogger(__name__)

STORED = "stored"


@dataclass(frozen=True)
class RawPayloadRef:
    raw_payload_id: str
    size: int
    sha256: str

    def as_document(self) -> dict[str, Any]:
        return {"raw_payload_id": self.raw_payload_id, "size": self.size, "sha256": self.sha256}


class RawPayloads:
    def __init__(self, db: AsyncDatabase) -> None:
        self._meta = db[RAW_PAYLOADS]
        self._bucket = AsyncGridFSBucket(db, bucket_name=RAW_PAYLOAD_BUCKET)

    async def save(
        self,
        payload_id: str,
        data: bytes,
        *,
        owner: str,
        encoding: str | None = None,
        content_type: str | None = None,
    ) -> RawPayloadRef:
        existing = await self._meta.find_one({"_id": payload_id})
        if existing is not None:
            return _ref(existing)
        gridfs_id = f"{payload_id}:{uuid.uuid4().hex[:12]}"
        await self._bucket.upload_from_stream_with_id(gridfs_id, payload_id, data, metadata={"owner": owner})
        ref = RawPayloadRef(payload_id, len(data), hashlib.sha256(data).hexdigest())
        try:
            await self._meta.insert_one(
                {
                    "_id": payload_id,
                    **ref.as_document(),
                    "task_error_id": owner,
                    "storage": "gridfs",
                    "bucket": RAW_PAYLOAD_BUCKET,
                    "gridfs_id": gridfs_id,
                    "encoding": encoding,
                    "content_type": content_type,
                    "created_at": clock.utcnow(),
                    "state": STORED,
                }
            )
        except DuplicateKeyError:  # saved meanwhile by another delivery of the same message
            await self._bucket.delete(gridfs_id)
            return _ref(await self._meta.find_one({"_id": payload_id}) or {})
        logger.info("raw payload %s stored in GridFS as %s (%d bytes)", payload_id, gridfs_id, len(data))
        return ref

    async def describe(self, payload_id: str) -> dict[str, Any] | None:
        return await self._meta.find_one({"_id": payload_id, "state": STORED})

    async def read(self, payload_id: str) -> bytes | None:
        """The payload's bytes; None if no complete payload is stored under this id."""
        meta = await self.describe(payload_id)
        if meta is None:
            return None
        try:
            stream = await self._bucket.open_download_stream(meta["gridfs_id"])
        except NoFile:
            return None
        return await stream.read()


def _ref(meta: dict[str, Any]) -> RawPayloadRef:
    return RawPayloadRef(str(meta["_id"]), int(meta["size"]), str(meta["sha256"]))
