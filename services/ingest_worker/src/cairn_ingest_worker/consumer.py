"""Celery's task consumer, except that nothing it cannot understand is silently dropped.

Out of the box, Celery acks (discards) a message whose body it cannot decode, and rejects one
that is not a task message or names an unknown task. Cairn dead-letters all of them instead,
as `contract_violation` with the reason in the error, then acks: the worker keeps consuming.
If the dead letter cannot be published (broker trouble), the message is rejected without
requeue, and the ingest queue's own dead-letter exchange still takes it to the DLQ.

Installed with Celery's `worker_consumer` setting (see celery_app.py).
"""

import logging
from typing import Any

from celery.worker.consumer.consumer import Consumer

from cairn_contracts.messages import OriginalMessage
from cairn_contracts.topology import QUEUE_INGEST
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_runtime.amqp import dead_letter_for, original_message

logger = logging.getLogger(__name__)

SERVICE = "ingest-worker"


class UnreadableMessage(Exception):
    """A message on a task queue that is not a task this worker can run."""


class DeadLetteringConsumer(Consumer):
    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, UnreadableMessage("not a Celery task message: it names no task"))

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = (getattr(message, "headers", None) or {}).get("task")
        self._dead_letter(message, UnreadableMessage(f"no task named {name!r} is registered here: {exc!r}"))

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, UnreadableMessage(f"invalid task message: {exc}"))

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        content_type = getattr(message, "content_type", None)
        self._dead_letter(message, UnreadableMessage(f"body cannot be decoded ({content_type}): {exc}"))

    def _dead_letter(self, message: Any, error: UnreadableMessage) -> None:
        logger.error("dead-lettering an unreadable message from %s: %s", QUEUE_INGEST, error)
        try:
            dead_letter = dead_letter_for(
                source_service=SERVICE,
                source_queue=QUEUE_INGEST,
                reason="contract_violation",
                error=error,
                original=original_of_kombu(message),
            )
            BrokerPublisher(self.app).publish_dead_letter(dead_letter)
        except Exception:
            logger.exception("dead letter not confirmed; rejecting the message to the broker's dead-letter exchange")
            message.reject_log_error(logger, self.connection_errors, requeue=False)
            return
        message.ack_log_error(logger, self.connection_errors)


def original_of_kombu(message: Any) -> OriginalMessage:
    raw = getattr(message, "body", b"")
    body = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw or b"")
    headers = dict(getattr(message, "headers", None) or {})
    content_type = (getattr(message, "properties", None) or {}).get("content_type") or getattr(message, "content_type", None)
    if content_type:
        headers.setdefault("content_type", content_type)
    routing_key = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    return original_message(body, headers, routing_key)
