"""Large raw payloads in GridFS, with a RawPayload metadata document in `raw_payloads`.

The DLQ handler keeps an original message body over its threshold out of task_errors: the bytes
go to the GridFS bucket `raw_payload_blobs` under a deterministic id, the `raw_payloads` document
describes them (size, sha256, encoding, owner), and the task_errors entry carries only a pointer.
The gateway reads them back for `GET /dlq/entries/{id}/payload`.

Saving is idempotent and crash-safe without transactions: the metadata document is written
after the upload completed, so its presence means the bytes are all there; without it, whatever
a crashed upload left behind is deleted and the upload starts over.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo.asynchronous.database import AsyncDatabase

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
        if existing is not None and existing.get("state") == STORED:
            return RawPayloadRef(payload_id, int(existing["size"]), str(existing["sha256"]))
        try:
            await self._bucket.delete(payload_id)  # the remains of an upload that did not finish
        except NoFile:
            pass
        await self._bucket.upload_from_stream_with_id(payload_id, payload_id, data, metadata={"owner": owner})
        ref = RawPayloadRef(payload_id, len(data), hashlib.sha256(data).hexdigest())
        await self._meta.update_one(
            {"_id": payload_id},
            {
                "$set": {
                    **ref.as_document(),
                    "task_error_id": owner,
                    "storage": "gridfs",
                    "bucket": RAW_PAYLOAD_BUCKET,
                    "gridfs_id": payload_id,
                    "encoding": encoding,
                    "content_type": content_type,
                    "stored_at_ms": int(time.time() * 1000),
                    "state": STORED,
                }
            },
            upsert=True,
        )
        logger.info("raw payload %s stored in GridFS (%d bytes)", payload_id, len(data))
        return ref

    async def describe(self, payload_id: str) -> dict[str, Any] | None:
        return await self._meta.find_one({"_id": payload_id, "state": STORED})

    async def read(self, payload_id: str) -> bytes | None:
        """The payload's bytes; None if no complete payload is stored under this id."""
        if await self.describe(payload_id) is None:
            return None
        try:
            stream = await self._bucket.open_download_stream(payload_id)
        except NoFile:
            return None
        return await stream.read()
