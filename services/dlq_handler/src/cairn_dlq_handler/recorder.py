"""Turns each dead-lettered message into exactly one task_errors document.

Two shapes arrive: Cairn's own `DeadLetter` envelopes (a service gave up, with the reason and
error), and raw messages the broker dead-lettered (rejected, expired), described by `x-death`.
The document id is derived from the message, so a redelivery after a crash records nothing new.
"""

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from cairn_contracts.messages import DeadLetter
from cairn_contracts.topology import HEADER_MESSAGE_TYPE
from cairn_runtime.amqp import original_of

logger = logging.getLogger(__name__)


class ErrorRecorder:
    def __init__(self, task_errors: AsyncCollection) -> None:
        self._task_errors = task_errors

    async def record(self, message: AbstractIncomingMessage) -> dict[str, Any]:
        document = error_document(message)
        try:
            await self._task_errors.insert_one(document)
            logger.info("recorded dead letter %s (%s)", document["_id"], document["reason"])
        except DuplicateKeyError:
            logger.info("dead letter %s was already recorded", document["_id"])
        return document


def error_document(message: AbstractIncomingMessage) -> dict[str, Any]:
    now = datetime.now(UTC)
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
                "_id": letter.dead_letter_id,
                "kind": "service",
            }
    return {**base, **_broker_dead_letter(message)}


def _broker_dead_letter(message: AbstractIncomingMessage) -> dict[str, Any]:
    original = original_of(message)
    deaths = original.headers.get("x-death") or []
    first_death = deaths[0] if deaths else {}
    fingerprint = hashlib.sha256(
        message.body + json.dumps([message.message_id, first_death], sort_keys=True, default=str).encode()
    ).hexdigest()
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
