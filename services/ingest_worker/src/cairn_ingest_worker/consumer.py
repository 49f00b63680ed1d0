"""Celery's task consumer, except that nothing it cannot understand is silently dropped or kills it.

Out of the box, Celery acks (discards) a message whose body it cannot decode, rejects one that is
not a task message or names an unknown task, and lets any other exception of its request parsing
(a body that is not `[args, kwargs, embed]`, a missing `id` header...) escape into its event loop,
which stops the worker, again on every restart since the message is never acked. Cairn
dead-letters all of them instead, as `contract_violation` with the reason in the error, then acks:
the worker keeps consuming. A body over `CAIRN_MAX_TASK_BODY_BYTES` is dead-lettered unparsed.
A compressed body is never inflated (`refuse_compression`): kombu would do it while building the
message, before any guard, so a small zip bomb would exhaust the worker's memory.

Each dead letter's id is derived from the delivery (body, headers, routing key), so a message
redelivered after a crash between the dead letter's publish and the ack is recorded once: the DLQ
handler keys task_errors on that id. If the dead letter cannot be published (broker trouble), the
message is rejected without requeue, and the ingest queue's own dead-letter exchange still takes
it to the DLQ.

Installed with Celery's `worker_consumer` setting (see celery_app.py).
"""

import hashlib
import json
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kombu.compression
from celery.worker.consumer.consumer import Consumer
from vine import promise

from cairn_contracts.messages import OriginalMessage
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD, TASK_RUN_SHARDS
from cairn_contracts.topology import QUEUE_INGEST
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_runtime.amqp import dead_letter_for, original_message

logger = logging.getLogger(__name__)

SERVICE = "ingest-worker"
CAIRN_TASKS = frozenset({TASK_RUN_SHARD, TASK_RUN_SHARDS, TASK_RUN_FRONTIER})
# app.conf key holding the largest task body parsed (bytes); set from the worker's settings.
MAX_BODY_CONF = "cairn_max_task_body_bytes"


class CompressionRefused(Exception):
    """A message body Cairn would have to decompress: its tasks are never compressed."""


def _refuse_to_decompress(body: bytes) -> bytes:
    raise CompressionRefused(f"a compressed body of {len(body)} bytes is not inflated")


def refuse_compression() -> None:
    """Make kombu refuse every compressed body in this process, keeping it as received.

    kombu inflates a body whose `compression` header names a method while it builds the message
    (`kombu.Message.__init__`), before the consumer's size guard: a 100 KB gzip of zeros becomes
    100 MB. With every method's decoder refusing, the body stays as sent, the message carries the
    error, and `DeadLetteringConsumer.on_decode_error` dead-letters it as received."""
    for content_type in kombu.compression.encoders():
        encoder, _ = kombu.compression.get_encoder(content_type)  # sending compressed stays possible
        kombu.compression.register(encoder, _refuse_to_decompress, content_type)


class UnreadableMessage(Exception):
    """A message on a task queue that is not a task this worker can run."""


class DeadLetteringConsumer(Consumer):
    def create_task_handler(self, promise: Callable[..., Any] = promise) -> Callable[[Any], Any]:
        """Celery's handler behind a guard: Cairn's tasks are checked for the shape Cairn sends
        (protocol 2: headers `id` and `task`, body `[[], {kwargs}, {embed}]`, bounded size), and
        any exception Celery's own parsing raises for one message dead-letters that message."""
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            problem = self._shape_problem(message)
            if problem is not None:
                return self._dead_letter(message, UnreadableMessage(problem))
            try:
                return handle(message)
            except Exception as error:  # whatever a hostile body makes Celery raise: never the loop
                if getattr(message, "acknowledged", False):
                    logger.exception("error after the message was settled; it is not dead-lettered")
                    return None
                return self._dead_letter(message, UnreadableMessage(f"Celery cannot parse this task message: {error!r}"))

        return on_task_received

    def _shape_problem(self, message: Any) -> str | None:
        """Why a message on the ingest queue is not a task Cairn sent; None if it may be.

        Celery's built-in tasks (`celery.chord_unlock`, which re-sends itself for ever,
        `celery.starmap`...) and messages naming no task (protocol 1) are refused, and so is every
        header Celery would act on that Cairn never sets (per-message time limits, which the pool
        parses outside any task; an ETA beyond Cairn's own short re-sends, which a worker would
        hold past RabbitMQ's consumer_timeout; expiry; compression). Cairn's own tasks are also
        checked for the body shape Cairn sends; other names are left to Celery (an unknown one is
        dead-lettered by `on_unknown_task`)."""
        headers = getattr(message, "headers", None)
        if not isinstance(headers, dict):
            headers = {}
        name = headers.get("task")
        if not isinstance(name, str) or name.startswith("celery."):
            return f"not a Cairn task: the message names {str(name)[:200]!r} (Celery's built-ins and protocol 1 are refused)"
        longest_s = float(self.app.conf.get("task_time_limit") or 0)
        header_problem = _header_problem(headers, longest_s)
        if header_problem is not None:
            return header_problem
        if name not in CAIRN_TASKS:
            return None
        limit = int(self.app.conf.get(MAX_BODY_CONF) or 0)
        size = len(getattr(message, "body", b"") or b"")
        if limit and size > limit:
            return f"body of {size} bytes is over the {limit}-byte limit of a task message"
        if not isinstance(headers.get("id"), str) or not headers["id"]:
            return "header `id` (the task id) is missing or not a string"
        try:
            body = message.decode()
        except Exception as error:
            return f"body cannot be decoded ({getattr(message, 'content_type', None)}): {error!r}"
        if not (isinstance(body, list) and len(body) == 3):
            return f"body is not [args, kwargs, embed]: a {type(body).__name__} of length {_length(body)}"
        args, kwargs, embed = body
        if args != []:
            return f"positional args are not accepted (Cairn's tasks take keyword arguments only): {str(args)[:200]}"
        if not isinstance(kwargs, dict):
            return f"kwargs is a {type(kwargs).__name__}, not an object"
        if not isinstance(embed, dict):
            return f"embed is a {type(embed).__name__}, not an object"
        linked = [key for key in ("callbacks", "errbacks", "chain", "chord") if embed.get(key)]
        if linked:
            return f"embed links other tasks ({', '.join(linked)}): Cairn's tasks are never linked"
        return None

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
            original = original_of_kombu(message)
            dead_letter = dead_letter_for(
                source_service=SERVICE,
                source_queue=QUEUE_INGEST,
                reason="contract_violation",
                error=error,
                original=original,
                dead_letter_id=stable_dead_letter_id(original),
            )
            BrokerPublisher(self.app).publish(dead_letter)
        except Exception:
            logger.exception("dead letter not confirmed; rejecting the message to the broker's dead-letter exchange")
            message.reject_log_error(logger, self.connection_errors, requeue=False)
            return
        message.ack_log_error(logger, self.connection_errors)


# Cairn re-sends a task itself with a short countdown (a slice hand-off: 0 s; a store outage: at
# most CAIRN_STORE_RETRY_MAX_S); an ETA further ahead is not Cairn's and would be held unacked.
MAX_ETA_AHEAD_S = 60.0


def _header_problem(headers: dict[str, Any], longest_s: float) -> str | None:
    """Why headers Celery acts on outside the task (time limits, ETA, expiry, compression) are not
    what Cairn sends; None if they are. `longest_s`: the worker's own hard time limit (0: none),
    the most a message may ask for (Celery copies the configured limits into the tasks it sends)."""
    timelimit = headers.get("timelimit")
    if timelimit is not None and not _time_limits_ok(timelimit, longest_s):
        return f"header `timelimit` {str(timelimit)[:100]!r}: not [hard, soft] seconds within the worker's {longest_s:g} s"
    if headers.get("expires") is not None:
        return "header `expires`: Cairn's tasks never expire"
    if headers.get("compression") is not None:
        return "header `compression`: Cairn never compresses task bodies"
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
        return f"header `retries` {str(retries)[:100]!r} is not a count"
    eta = headers.get("eta")
    if eta is not None:
        try:
            due = datetime.fromisoformat(str(eta))
        except ValueError:
            return f"header `eta` {str(eta)[:100]!r} is not an ISO 8601 time"
        if due.tzinfo is None:
            due = due.replace(tzinfo=UTC)
        ahead_s = (due - datetime.now(UTC)).total_seconds()
        if ahead_s > MAX_ETA_AHEAD_S:
            return f"header `eta` {eta!r} is {ahead_s:.0f} s ahead: over the {MAX_ETA_AHEAD_S:.0f} s of Cairn's own re-sends"
    return None


def _time_limits_ok(timelimit: Any, longest_s: float) -> bool:
    if not isinstance(timelimit, (list, tuple)) or len(timelimit) != 2:
        return False
    for limit in timelimit:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            return False
        if longest_s and limit > longest_s:
            return False
    return True


def _length(value: Any) -> str:
    return str(len(value)) if isinstance(value, (list, dict, str)) else "-"


def stable_dead_letter_id(original: OriginalMessage, reason: str = "contract_violation") -> str:
    """The same id for every delivery of the same message (body, headers, routing key): the DLQ
    handler keys task_errors on it, so a redelivered message is recorded once."""
    # A quorum queue counts redeliveries in a header: not part of the message's identity.
    headers = {k: v for k, v in original.headers.items() if k != "x-delivery-count"}
    identity = json.dumps([reason, original.body, original.body_encoding, headers, original.routing_key], sort_keys=True, default=str)
    return f"{SERVICE}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


def original_of_kombu(message: Any) -> OriginalMessage:
    raw = getattr(message, "body", b"")
    body = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw or b"")
    headers = dict(getattr(message, "headers", None) or {})
    content_type = (getattr(message, "properties", None) or {}).get("content_type") or getattr(message, "content_type", None)
    if content_type:
        headers.setdefault("content_type", content_type)
    routing_key = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    return original_message(body, headers, routing_key)
