"""Turns each dead-lettered message into exactly one task_errors document.

Two shapes arrive: Cairn's own `DeadLetter` envelopes (a service gave up, with the reason and
error), and raw messages the broker dead-lettered (rejected, expired), described by `x-death`.
The document id is derived from the message, so a redelivery after a crash records nothing new.
"""

import base64
import hashlib
import json
import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.messages import DeadLetter
from cairn_contracts.store import DEFAULT_TENANT
from cairn_contracts.topology import HEADER_MESSAGE_TYPE
from cairn_dlq_handler.metrics import DEAD_LETTER_DUPLICATES, count_recorded
from cairn_runtime.amqp import original_of
from cairn_runtime.payloads import RawPayloads
from cairn_runtime.tracing import describe_work

logger = logging.getLogger(__name__)

RAW_PAYLOAD_THRESHOLD_BYTES = 64 * 1024
PREVIEW_CHARS = 1024


class ErrorRecorder:
    """`jobs`: to note each entry's pipeline and tenant (filters of the DLQ API). `payloads`: where
    an original body over `raw_payload_threshold_bytes` goes (GridFS), leaving a pointer here."""

    def __init__(
        self,
        task_errors: AsyncCollection,
        *,
        jobs: AsyncCollection | None = None,
        payloads: RawPayloads | None = None,
        raw_payload_threshold_bytes: int = RAW_PAYLOAD_THRESHOLD_BYTES,
    ) -> None:
        self._task_errors = task_errors
        self._jobs = jobs
        self._payloads = payloads
        self._threshold = raw_payload_threshold_bytes

    async def record(self, message: AbstractIncomingMessage) -> dict[str, Any]:
        document = error_document(message)
        describe_work(job_id=document.get("job_id"), shard_key=document.get("shard_key"), dead_letter_id=document["_id"])
        if await self._task_errors.find_one({"_id": document["_id"]}, {"_id": 1}) is not None:
            logger.info("dead letter %s was already recorded", document["_id"])
            DEAD_LETTER_DUPLICATES.inc()
            return document
        await self._describe_job(document)
        await self._keep_large_body_aside(document)
        try:
            await self._task_errors.insert_one(document)
            logger.info("recorded dead letter %s (%s)", document["_id"], document["reason"])
            count_recorded(document)
        except DuplicateKeyError:
            logger.info("dead letter %s was already recorded", document["_id"])
        return document

    async def _describe_job(self, document: dict[str, Any]) -> None:
        job = None
        if self._jobs is not None and document.get("job_id"):
            job = await self._jobs.find_one({"_id": document["job_id"]}, {"pipeline": 1, "tenant": 1})
        document["pipeline"] = (job or {}).get("pipeline")
        document["tenant"] = (job or {}).get("tenant") or DEFAULT_TENANT

    async def _keep_large_body_aside(self, document: dict[str, Any]) -> None:
        """Store an original body over the threshold in GridFS; the entry keeps a pointer and a preview."""
        original = document.get("original") or {}
        body = original.get("body")
        if self._payloads is None or not isinstance(body, str):
            return
        encoding = original.get("body_encoding", "utf-8")
        raw = base64.b64decode(body) if encoding == "base64" else body.encode("utf-8")
        if len(raw) <= self._threshold:
            return
        headers = original.get("headers") or {}
        ref = await self._payloads.save(
            f"{document['_id']}.body",
            raw,
            owner=document["_id"],
            encoding=encoding,
            content_type=headers.get("content_type") if isinstance(headers, dict) else None,
        )
        original["body"] = None
        original["body_preview"] = body[:PREVIEW_CHARS]
        original["payload_ref"] = ref.as_document()
        document["raw_payload_id"] = ref.raw_payload_id


def error_document(message: AbstractIncomingMessage) -> dict[str, Any]:
    now = clock.utcnow()
    base = {"created_at": now, "status": "open", "replays": []}
    if (message.headers or {}).get(HEADER_MESSAGE_TYPE) == DeadLetter.message_type:
        try:
            letter = DeadLetter.model_validate_json(message.body)
        except ValidationError:
            logger.warning("a dead-letter envelope that does not validate; recorded as raw")
        else:
            return {
                **base,
                **letter.model_dump(mode="json", exclude={"dead_letter_id"}),
                # Deliveries are handled concurrently, so record time does not follow failure
                # order; the list's "newest first" is by when the letter was made.
                "created_at": letter.dead_lettered_at,
                "_id": letter.dead_letter_id,
                "kind": "service",
            }
    return {**base, **_broker_dead_letter(message)}


def _broker_dead_letter(message: AbstractIncomingMessage) -> dict[str, Any]:
    original = original_of(message)
    deaths = original.headers.get("x-death") or []
    first_death = deaths[0] if deaths else {}
    # Celery's task messages have no message_id; its task id travels as the correlation id.
    identity = [message.message_id, message.correlation_id, first_death]
    fingerprint = hashlib.sha256(message.body + json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    task = _celery_task(original.headers, message.body)
    return {
        "_id": f"broker-{fingerprint[:32]}",
        "kind": "broker",
        "reason": str(first_death.get("reason", "unknown")),
        "error_type": "BrokerDeadLetter",
        "error_message": f"dead-lettered by the broker from {first_death.get('queue', '?')}: {first_death.get('reason', '?')}",
        "source_queue": first_death.get("queue"),
        "job_id": task.get("job_id"),
        "shard_key": task.get("shard_key"),
        "attempts": int(first_death.get("count", 1) or 1),
        "death_headers": deaths,
        "original": original.model_dump(mode="json"),
    }


def _celery_task(headers: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The kwargs of a Celery protocol-2 task message, if that is what this is."""
    if "task" not in headers:
        return {}
    try:
        args, kwargs, _ = json.loads(body)
        return kwargs if isinstance(kwargs, dict) else {}
    except (ValueError, TypeError):
        return {}
