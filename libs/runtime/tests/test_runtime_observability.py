"""Observability plumbing: log context and formats, sampling, trace propagation through a real
broker, client spans against a real MongoDB-wire server, publish metrics, multiprocess reaping."""

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from cairn_contracts.messages import ShardFinished, StartJob
from cairn_contracts.topology import (
    EXCHANGE_COMMANDS,
    QUEUE_SCHEDULER_COMMANDS,
    QUEUE_SCHEDULER_EVENTS,
)
from cairn_runtime import log
from cairn_runtime.amqp import PublishNotConfirmed
from cairn_runtime.consumer import ContractConsumer
from cairn_runtime.instrumentation import instrument_clients, queue_wait_s
from cairn_runtime.log import TextFormatter, configure_logging, log_context
from cairn_runtime.metrics import reap_dead_processes
from cairn_runtime.mongo import async_client
from cairn_runtime.tracing import cairn_sampler, describe_work, message_attributes
from cairn_testkit.aio import next_message

START = StartJob.model_validate(
    {"job_id": "job-obs", "tenant": "acme", "spec": {"pipeline": "synthetic", "params": {"count": 3}}}
)


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def _global_exporter() -> InMemorySpanExporter:
    """The process's tracer provider (set once, as a service does), recording into memory."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=cairn_sampler())
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_global_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    _global_exporter.clear()
    yield _global_exporter
    _global_exporter.clear()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --------------------------------------------------------------------------------- logs
def test_json_lines_carry_trace_correlation_job_and_shard(restore_logging) -> None:
    stream = io.StringIO()
    configure_logging("svc", "INFO", "json", stream=stream)
    tracer = TracerProvider().get_tracer("tests")

    with tracer.start_as_current_span("work") as span, log_context(job_id="j1", shard_key="j1:0003", correlation_id="c9"):
        logging.getLogger("cairn.test").info("batch %d stored", 7)
        trace_id = format(span.get_span_context().trace_id, "032x")
    logging.getLogger("cairn.test").info("outside")

    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "batch 7 stored"
    assert inside["level"] == "INFO" and inside["service"] == "svc" and inside["logger"] == "cairn.test"
    assert (inside["trace_id"], inside["correlation_id"], inside["job_id"], inside["shard_key"]) == (trace_id, "c9", "j1", "j1:0003")
    assert (outside["trace_id"], outside["correlation_id"], outside["job_id"], outside["shard_key"]) == (None, None, None, None)


def test_text_on_a_terminal_is_coloured_with_the_context_at_the_end(restore_logging, monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = FakeTerminal()
    configure_logging("svc", "INFO", "auto", stream=terminal)

    with log_context(job_id="j2", shard_key="j2:0000", correlation_id="j2"):
        logging.getLogger("x").warning("slow batch")

    line = terminal.getvalue().rstrip("\n")
    assert "\x1b[33mWARNING\x1b[0m" in line
    assert line.endswith("\x1b[2m[job=j2 shard=j2:0000]\x1b[0m"), line  # correlation = job id: not repeated
    assert not line.startswith("{")


def test_text_without_a_terminal_or_with_no_color_has_no_escape_codes(monkeypatch) -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
    record.service, record.job_id, record.shard_key, record.correlation_id, record.trace_id = "svc", "j3", None, "c1", "ab" * 16
    assert TextFormatter(colour=False).format(record).endswith(f"svc x: boom [job=j3 corr=c1 trace={'ab' * 16}]")

    monkeypatch.setenv("NO_COLOR", "1")
    assert not log.wants_colour(FakeTerminal())


def test_log_context_restores_and_bind_keeps_what_is_unset() -> None:
    with log_context(job_id="outer"):
        with log_context(job_id="inner", shard_key="s", correlation_id=None):
            log.bind(shard_key=None, correlation_id="c")
            assert (log.job_id.get(), log.shard_key.get(), log.correlation_id.get()) == ("inner", "s", "c")
        assert (log.job_id.get(), log.shard_key.get(), log.correlation_id.get()) == ("outer", None, None)
    assert log.job_id.get() is None


# --------------------------------------------------------------------------------- tracing
def test_the_sampler_drops_lone_client_spans_and_keeps_their_children_of_traced_work() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=cairn_sampler())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")

    with tracer.start_as_current_span("heartbeat renew", kind=trace.SpanKind.CLIENT) as lone:
        assert not lone.is_recording()
    with tracer.start_as_current_span("consume", kind=trace.SpanKind.CONSUMER):
        with tracer.start_as_current_span("db.update", kind=trace.SpanKind.CLIENT):
            pass

    assert [(s.name, s.kind) for s in exporter.get_finished_spans()] == [
        ("db.update", trace.SpanKind.CLIENT),
        ("consume", trace.SpanKind.CONSUMER),
    ]


def test_message_attributes_name_job_shard_tenant_and_pipeline() -> None:
    assert message_attributes(START) == {"job_id": "job-obs", "tenant": "acme", "pipeline": "synthetic"}
    finished = ShardFinished(job_id="j", shard_key="j:0001", outcome="succeeded", records_done=1)
    assert message_attributes(finished) == {"job_id": "j", "shard_key": "j:0001"}
    assert message_attributes(object()) == {}


async def test_publish_and_consume_form_one_trace_with_the_job_on_every_span(broker, spans) -> None:
    tracer = trace.get_tracer("tests")
    seen: list[tuple[str | None, str | None]] = []

    async def handler(message: StartJob) -> None:
        seen.append((log.job_id.get(), log.correlation_id.get()))

    with tracer.start_as_current_span("POST /task/start", kind=trace.SpanKind.SERVER) as request:
        await broker.publisher.publish(START, correlation_id="job-obs")
    message = await next_message(broker.queues[QUEUE_SCHEDULER_COMMANDS], no_ack=False)
    consumer = ContractConsumer(
        service="tests", queue=broker.queues[QUEUE_SCHEDULER_COMMANDS], model=StartJob, handler=handler, publisher=broker.publisher
    )
    await consumer.on_message(message)

    by_name = {s.name: s for s in spans.get_finished_spans()}
    publish, consume = by_name[f"publish {EXCHANGE_COMMANDS}"], by_name[f"consume {QUEUE_SCHEDULER_COMMANDS}"]
    assert publish.kind == trace.SpanKind.PRODUCER and consume.kind == trace.SpanKind.CONSUMER
    assert publish.parent.span_id == request.get_span_context().span_id
    assert consume.parent.span_id == publish.context.span_id
    assert consume.context.trace_id == request.get_span_context().trace_id
    for span in (publish, consume):
        assert span.attributes["cairn.job_id"] == "job-obs"
        assert span.attributes["cairn.tenant"] == "acme"
        assert span.attributes["cairn.pipeline"] == "synthetic"
    assert consume.attributes["messaging.source.name"] == QUEUE_SCHEDULER_COMMANDS
    assert seen == [("job-obs", "job-obs")]  # the handler logs with the job's ids...
    assert (log.job_id.get(), log.correlation_id.get()) == (None, None)  # ...and only the handler


async def test_a_consumed_event_without_trace_context_starts_its_own_trace(broker, spans) -> None:
    event = ShardFinished(job_id="j", shard_key="j:0002", outcome="succeeded", records_done=1)
    await broker.publisher.publish(event)
    message = await next_message(broker.queues[QUEUE_SCHEDULER_EVENTS], no_ack=False)

    async def handler(_: ShardFinished) -> None:
        pass

    consumer = ContractConsumer(
        service="tests", queue=broker.queues[QUEUE_SCHEDULER_EVENTS], model=ShardFinished, handler=handler, publisher=broker.publisher
    )
    await consumer.on_message(message)

    (consume,) = spans.get_finished_spans()
    assert consume.parent is None
    assert consume.attributes["cairn.shard_key"] == "j:0002"


async def test_mongodb_commands_are_child_spans_of_the_work_and_never_traces_of_their_own(test_env, mongo_db, spans) -> None:
    instrument_clients()  # before the client is built: pymongo takes its listeners then
    client = async_client(test_env.mongodb_uri)
    try:
        collection = client[mongo_db.name]["observed"]
        await collection.insert_one({"_id": 1})  # no span in progress: no trace
        with trace.get_tracer("tests").start_as_current_span("batch") as batch:
            describe_work(job_id="j-mongo")
            await collection.find_one({"_id": 1})
    finally:
        await client.close()

    finished = spans.get_finished_spans()
    (find,) = [s for s in finished if s.kind == trace.SpanKind.CLIENT]
    assert find.name.endswith(".find") and find.attributes["db.system"] == "mongodb"
    assert find.parent.span_id == batch.get_span_context().span_id
    assert [s.name for s in finished if s.parent is None] == ["batch"]
    assert batch.attributes["cairn.job_id"] == "j-mongo"


# --------------------------------------------------------------------------------- metrics
async def test_confirmed_and_refused_publishes_are_measured_per_exchange(broker) -> None:
    confirmed = sample("cairn_publish_confirm_seconds_count", {"exchange": EXCHANGE_COMMANDS})
    refused = sample("cairn_publish_failures_total", {"exchange": EXCHANGE_COMMANDS})

    await broker.publisher.publish(START)
    with pytest.raises(PublishNotConfirmed):
        # no message type routes there: only a raw publish can name an unbound routing key
        await broker.publisher.publish_bytes(EXCHANGE_COMMANDS, "no.such.route", START.model_dump_json().encode(), headers={})

    assert sample("cairn_publish_confirm_seconds_count", {"exchange": EXCHANGE_COMMANDS}) == confirmed + 1
    assert sample("cairn_publish_failures_total", {"exchange": EXCHANGE_COMMANDS}) == refused + 1


def test_queue_wait_counts_from_the_send_or_from_a_delayed_retry_s_due_time() -> None:
    now = 1_000_000.0
    assert queue_wait_s(now - 2.5, None, now) == pytest.approx(2.5)
    assert queue_wait_s(str(now - 2.5), None, now) == pytest.approx(2.5)  # header values may be text
    due = datetime.fromtimestamp(now - 1, UTC)
    assert queue_wait_s(now - 30, due.isoformat(), now) == pytest.approx(1.0)
    assert queue_wait_s(now - 30, due, now) == pytest.approx(1.0)
    assert queue_wait_s(now + 3, None, now) == 0.0  # another host's clock runs ahead
    assert queue_wait_s(None, (due + timedelta(hours=1)).isoformat(), now) is None
    assert queue_wait_s("not a time", None, now) is None


def test_live_gauges_of_dead_processes_are_reaped_and_totals_kept(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    alive_pid = os.getpid()
    for name in (
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_liveall_{dead_pid}.db",
        f"counter_{dead_pid}.db",
        f"histogram_{dead_pid}.db",
        f"gauge_livesum_{alive_pid}.db",
    ):
        (tmp_path / name).write_bytes(b"")

    assert reap_dead_processes(tmp_path) == [dead_pid]

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead_pid}.db", f"histogram_{dead_pid}.db", f"gauge_livesum_{alive_pid}.db"]
    )
