"""The one logging set-up: JSON lines in production, readable text in a terminal.

Every record carries the current trace id, correlation id, job id and shard id, so a line of
work can be followed across services (`grep <job id>` over every service's log, or a trace id
from Jaeger). The job and shard ids are set by whatever knows them: the consumers once a message
names a job, the worker around a shard run, the gateway once a job is recorded.
"""

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
shard_key: ContextVar[str | None] = ContextVar("shard_key", default=None)

_CONTEXT_VARS = {"correlation_id": correlation_id, "job_id": job_id, "shard_key": shard_key}


def bind(**values: str | None) -> None:
    """Set log context (`job_id`, `shard_key`, `correlation_id`) for the rest of the current
    context; values that are None are left as they are. Scope it with `log_context`."""
    for name, value in values.items():
        if value is not None:
            _CONTEXT_VARS[name].set(value)


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Log context for the duration of a block, restored afterwards (None clears a field)."""
    tokens = [(_CONTEXT_VARS[name], _CONTEXT_VARS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.service = self._service
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
        record.correlation_id = correlation_id.get()
        record.job_id = job_id.get()
        record.shard_key = shard_key.get()
        return True


_LEVEL_COLOURS = {
    logging.DEBUG: "\x1b[2m",  # dim
    logging.INFO: "\x1b[32m",  # green
    logging.WARNING: "\x1b[33m",  # yellow
    logging.ERROR: "\x1b[31m",  # red
    logging.CRITICAL: "\x1b[1;31m",  # bold red
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class TextFormatter(logging.Formatter):
    """One readable line: time, level, service, logger, message, then the context that is set
    (`job=… shard=… trace=…`); with `colour`, the level is coloured and the context dimmed."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(service)s %(name)s: %(message)s")
        self._colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{label}={value}"
            for label, value in (
                ("job", getattr(record, "job_id", None)),
                ("shard", getattr(record, "shard_key", None)),
                ("corr", _unless_same(getattr(record, "correlation_id", None), getattr(record, "job_id", None))),
                ("trace", getattr(record, "trace_id", None)),
            )
            if value
        )
        if not self._colour:
            return f"{line} [{context}]" if context else line
        colour = _LEVEL_COLOURS.get(record.levelno, "")
        line = line.replace(record.levelname, f"{colour}{record.levelname}{_RESET}", 1)
        return f"{line} {_DIM}[{context}]{_RESET}" if context else line


def _unless_same(value: str | None, other: str | None) -> str | None:
    return None if value == other else value


def wants_colour(stream: TextIO) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def configure_logging(service: str, level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter(service))
    if use_json:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(trace_id)s %(correlation_id)s"
                " %(job_id)s %(shard_key)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter(colour=wants_colour(stream)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "pymongo", "httpx", "amqp", "kombu"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
