"""What a worker process tells operators about the task it runs, wired through Celery's signals.

- before a task runs (after OpenTelemetry's handler opened the task's span): the job and shard it
  names go into the log context and onto the span; its queue wait (enqueue, or due time of a
  delayed retry, until now) is observed; the running-tasks gauge goes up.
- after it ran: its duration by outcome (the task's return value, or `retry`/`failure`), the
  gauge goes down, the log context is restored.
- `note_shard`, called by the runner once it knows the claimed shard's job: pipeline and tenant
  on the span and the pipeline label for the outcome counters (the runner scopes the log context).

`connect_signals` must run after `instrument_celery` (receivers run in the order connected).
"""

import logging
import time
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

from celery import signals

from cairn_contracts.topology import HEADER_ENQUEUED_AT
from cairn_ingest_worker import metrics
from cairn_runtime.instrumentation import queue_wait_s
from cairn_runtime.log import log_context
from cairn_runtime.tracing import annotate_current_span

logger = logging.getLogger(__name__)

_pipeline: ContextVar[str] = ContextVar("cairn_worker_pipeline", default="unknown")
_running: dict[str, tuple[float, AbstractContextManager[None]]] = {}


def current_pipeline() -> str:
    """The pipeline of the shard this task runs ("unknown" before its job was read)."""
    return _pipeline.get()


def note_shard(*, job_id: str, shard_key: str, pipeline: str, tenant: str | None, attempt: int | None = None) -> None:
    _pipeline.set(pipeline)
    annotate_current_span(job_id=job_id, shard_key=shard_key, pipeline=pipeline, tenant=tenant, attempt=attempt)


def connect_signals() -> None:
    signals.task_prerun.connect(_task_prerun, weak=False, dispatch_uid="cairn.worker.task_prerun")
    signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid="cairn.worker.task_postrun")


def _task_prerun(task_id: str | None = None, task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    if task_id is None or task is None:
        return
    kwargs = kwargs or {}
    job_id = _text(kwargs.get("job_id"))
    shard_key = _text(kwargs.get("shard_key"))
    _pipeline.set("unknown")
    # The job id is the correlation id of all of a job's work (the gateway publishes with it).
    context = log_context(job_id=job_id, shard_key=shard_key, correlation_id=job_id)
    context.__enter__()
    _running[task_id] = (time.perf_counter(), context)
    annotate_current_span(job_id=job_id, shard_key=shard_key, task_id=task_id)
    request = task.request
    # A message's own headers are attributes of the request (an eagerly applied task has them
    # under `headers`).
    enqueued_at = request.get(HEADER_ENQUEUED_AT) or (request.get("headers") or {}).get(HEADER_ENQUEUED_AT)
    wait = queue_wait_s(enqueued_at, request.get("eta"), time.time())
    if wait is not None:
        metrics.QUEUE_WAIT_SECONDS.observe(wait)
    metrics.TASKS_RUNNING.inc()


def _task_postrun(
    task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    running = _running.pop(task_id, None) if task_id is not None else None
    if running is None:
        return
    started, context = running
    metrics.TASKS_RUNNING.dec()
    outcome = retval if isinstance(retval, str) else (state or "unknown").lower()
    metrics.SHARD_RUN_SECONDS.labels(getattr(task, "name", "unknown"), outcome).observe(time.perf_counter() - started)
    try:
        context.__exit__(None, None, None)
    except ValueError:  # a token of another context (never expected): leave the fields as they are
        logger.debug("log context of task %s was not restored", task_id)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
