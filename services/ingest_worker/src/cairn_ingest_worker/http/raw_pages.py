"""Raw pages of the `http_json` pipeline kept in GridFS, described in `raw_payloads` (the worker's
synchronous twin of `cairn_runtime.payloads.RawPayloads`, same documents, same crash safety).

A page's payload id is content-addressed (`http:<sha256 of the bytes>`): a page fetched again
after a crash, or unchanged on a later run, names the same payload and is stored once; a changed
page is a new payload. Every upload goes to a GridFS file of its own (`<payload id>:<random>`), and
the `raw_payloads` document, inserted once the upload completed, names the one that counts (see
payloads.py for why, and docs/mongodb-stand-in.md for the stand-in's GridFS gap).
"""

import hashlib
import logging
import uuid
from typing import Any

from gridfs import GridFSBucket
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.store import RAW_PAYLOAD_BUCKET, RAW_PAYLOADS

logger = logging.getLogger(__name__)

STORED = "stored"


def payload_id(content: bytes) -> str:
    return f"http:{hashlib.sha256(content).hexdigest()}"


class RawPages:
    """Saves raw pages in `db`, the job's tenant namespace (`RunContext.store_db`: raw pages are the
    tenant's data, never kept beside Cairn's control collections), GridFS bucket `raw_payload_blobs`."""

    def __init__(self, db: Database) -> None:
        self._meta = db[RAW_PAYLOADS]
        self._bucket = GridFSBucket(db, bucket_name=RAW_PAYLOAD_BUCKET)

    def save(self, content: bytes, *, url: str, owner: str, content_type: str | None = "application/json") -> str:
        """Store the page's bytes (once per content); its payload id, the pointer records carry.
        `owner`: who fetched it (`job:<job id>`); `url`: where from (no query secrets: none are
        ever put in URLs). Raises pymongo errors (the batch fails and is retried)."""
        pid = payload_id(content)
        if self._meta.find_one({"_id": pid}, {"_id": 1}) is not None:
            return pid
        gridfs_id = f"{pid}:{uuid.uuid4().hex[:12]}"
        self._bucket.upload_from_stream_with_id(gridfs_id, pid, content, metadata={"owner": owner})
        try:
            self._meta.insert_one(
                {
                    "_id": pid,
                    "raw_payload_id": pid,
                    "size": len(content),
                    "sha256": pid.removeprefix("http:"),
                    "owner": owner,
                    "source_url": url,
                    "storage": "gridfs",
                    "bucket": RAW_PAYLOAD_BUCKET,
                    "gridfs_id": gridfs_id,
                    "encoding": None,
                    "content_type": content_type,
                    "created_at": clock.utcnow(),
                    "state": STORED,
                }
            )
        except DuplicateKeyError:  # the same bytes saved meanwhile by another worker
            self._bucket.delete(gridfs_id)
        return pid

    def read(self, pid: str) -> bytes | None:
        """The bytes of a stored page; None if no complete page is stored under `pid`."""
        meta: dict[str, Any] | None = self._meta.find_one({"_id": pid, "state": STORED})
        if meta is None:
            return None
        return self._bucket.open_download_stream(meta["gridfs_id"]).read()
