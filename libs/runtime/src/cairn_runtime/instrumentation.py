"""Client instrumentation: MongoDB commands and Redis calls as child spans of the work they serve.

Call `instrument_clients()` once per process at start-up, before any client is created
(pymongo captures its command listeners when a client is built): in the asyncio services right
after `setup_tracing`, in the Celery worker in each prefork child (`worker_process_init`).

pymongo: OpenTelemetry's instrumentation registers a global command listener
(`pymongo.monitoring.register`), which `MongoClient` and `AsyncMongoClient` both honour; command
events are published in the task or thread that runs the command, so the span in progress is the
parent. Redis: the `redis` and `redis.asyncio` clients are wrapped. Calls made outside any span
(heartbeats, periodic counts) start no trace: see `tracing.NoOrphanClientSpans`.

Celery (`instrument_celery`, in every process that sends or runs Celery tasks): OpenTelemetry's
instrumentation puts the trace context into each task message and opens the worker's task span
as its child; Cairn's own signal handlers stamp the enqueue time into the message (for the
worker's queue-wait histogram) and time each send until the broker's confirm.
"""

import logging
import threading
import time
from typing import Any

from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor

from cairn_contracts.clock import parse_moment
from cairn_contracts.topology import HEADER_ENQUEUED_AT
from cairn_runtime.metrics import PUBLISH_SECONDS

logger = logging.getLogger(__name__)


def instrument_clients() -> None:
    """Instrument pymongo and redis (idempotent)."""
    for instrumentor in (PymongoInstrumentor(), RedisInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def instrument_celery() -> None:
    """Trace context and enqueue time in every task message this process sends, trace spans for
    the tasks it runs, and publish-confirm latency of its sends (idempotent)."""
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    signals.before_task_publish.connect(_before_task_publish, weak=False, dispatch_uid="cairn.before_task_publish")
    signals.after_task_publish.connect(_after_task_publish, weak=False, dispatch_uid="cairn.after_task_publish")


_sending = threading.local()  # a send is synchronous: before and after run on the same thread


def _before_task_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers[HEADER_ENQUEUED_AT] = time.time()  # a retry's message gets its own
    _sending.started = time.perf_counter()


def _after_task_publish(exchange: str | None = None, routing_key: str | None = None, **_: Any) -> None:
    started = getattr(_sending, "started", None)
    if started is not None:
        # Celery sends a task routed by queue through the default exchange, straight to the queue:
        # the queue's name is the label then (cairn.ingest).
        PUBLISH_SECONDS.labels(exchange or routing_key or "(default)").observe(time.perf_counter() - started)
        _sending.started = None


def queue_wait_s(enqueued_at: object, eta: object, started_at: float) -> float | None:
    """Seconds a task message waited for a worker: from when it was sent (or, for a delayed
    retry, from when it became due) to `started_at` (epoch seconds); None when the message does
    not say when it was sent. Never negative (clocks of two hosts differ a little)."""
    try:
        ready = float(enqueued_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    due = parse_moment(eta)
    if due is not None:
        ready = max(ready, due.timestamp())
    return max(0.0, started_at - ready)
