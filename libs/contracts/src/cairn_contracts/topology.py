"""Exchanges, queues, bindings and routing keys: the broker layout every service declares.

Declaring is idempotent, so each service declares the whole layout at start-up; the arguments
below must therefore be identical everywhere (RabbitMQ refuses a redeclare with other arguments).
"""

from dataclasses import dataclass, field
from typing import Any

EXCHANGE_COMMANDS = "cairn.commands"  # direct: commands to the scheduler and the DLQ handler
EXCHANGE_EVENTS = "cairn.events"  # topic: facts published by workers
EXCHANGE_TASKS = "cairn.tasks"  # direct: Celery shard tasks
EXCHANGE_DLX = "cairn.dlx"  # topic: everything that could not succeed
# AMQP's default exchange routes by queue name. Celery sends a task routed to a queue of a direct
# exchange through it (celery.app.amqp send_task_message), so shard tasks reach cairn.ingest by
# this route; the cairn.tasks/ingest binding serves raw publishes (tests, tools).
EXCHANGE_DEFAULT = ""

ROUTING_START_JOB = "job.start"
ROUTING_CANCEL_JOB = "job.cancel"
ROUTING_SHARD_SUCCEEDED = "shard.succeeded"
ROUTING_SHARD_FAILED = "shard.failed"
ROUTING_SHARD_CANCELLED = "shard.cancelled"
ROUTING_INGEST = "ingest"
ROUTING_DLQ_REPLAY = "dlq.replay"
ROUTING_DLQ_DISCARD = "dlq.discard"

QUEUE_SCHEDULER_COMMANDS = "cairn.scheduler.commands"
# Control commands (cancel) have a queue of their own: a cancel never waits behind a backlog of
# start commands.
QUEUE_SCHEDULER_CONTROL = "cairn.scheduler.control"
QUEUE_SCHEDULER_EVENTS = "cairn.scheduler.events"
QUEUE_INGEST = "cairn.ingest"
QUEUE_DLQ = "cairn.dlq"
QUEUE_DLQ_COMMANDS = "cairn.dlq_handler.commands"  # replay / discard a recorded dead letter
QUEUE_DLQ_EVENTS = "cairn.dlq_handler.events"  # shard outcomes settle the replays in flight

MAX_PRIORITY = 4

# Headers carried by every Cairn message besides the W3C `traceparent`/`tracestate`.
HEADER_MESSAGE_TYPE = "x-cairn-type"
HEADER_SCHEMA_VERSION = "x-cairn-schema"
HEADER_CORRELATION_ID = "x-correlation-id"
HEADER_SOURCE_QUEUE = "x-cairn-source-queue"
# Celery shard tasks: when the message was handed to the broker (epoch seconds), for queue wait.
HEADER_ENQUEUED_AT = "x-cairn-enqueued-at"


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str  # "direct" | "topic" | "fanout"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key)
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """Where a message is published: `Message.route()` gives it, `publish(message)` uses it."""

    exchange: str
    routing_key: str


def _work_queue_arguments(*, priorities: bool) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-dead-letter-exchange": EXCHANGE_DLX}
    if priorities:
        arguments["x-max-priority"] = MAX_PRIORITY
    return arguments


EXCHANGES: tuple[ExchangeSpec, ...] = (
    ExchangeSpec(EXCHANGE_COMMANDS, "direct"),
    ExchangeSpec(EXCHANGE_EVENTS, "topic"),
    ExchangeSpec(EXCHANGE_TASKS, "direct"),
    ExchangeSpec(EXCHANGE_DLX, "topic"),
)

QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec(
        QUEUE_SCHEDULER_COMMANDS,
        bindings=((EXCHANGE_COMMANDS, ROUTING_START_JOB),),
        arguments=_work_queue_arguments(priorities=True),
    ),
    QueueSpec(
        QUEUE_SCHEDULER_CONTROL,
        bindings=((EXCHANGE_COMMANDS, ROUTING_CANCEL_JOB),),
        arguments=_work_queue_arguments(priorities=False),
    ),
    QueueSpec(
        QUEUE_SCHEDULER_EVENTS,
        bindings=((EXCHANGE_EVENTS, "shard.*"),),
        arguments=_work_queue_arguments(priorities=False),
    ),
    QueueSpec(
        QUEUE_INGEST,
        bindings=((EXCHANGE_TASKS, ROUTING_INGEST),),
        arguments=_work_queue_arguments(priorities=True),
    ),
    QueueSpec(
        QUEUE_DLQ_COMMANDS,
        bindings=((EXCHANGE_COMMANDS, ROUTING_DLQ_REPLAY), (EXCHANGE_COMMANDS, ROUTING_DLQ_DISCARD)),
        arguments=_work_queue_arguments(priorities=False),
    ),
    QueueSpec(
        QUEUE_DLQ_EVENTS,
        bindings=((EXCHANGE_EVENTS, "shard.*"),),
        arguments=_work_queue_arguments(priorities=False),
    ),
    # The DLQ has no dead-letter exchange of its own: a message that cannot even be recorded
    # stays in it (unacked messages are redelivered) rather than vanish.
    QueueSpec(QUEUE_DLQ, bindings=((EXCHANGE_DLX, "#"),)),
)


def queue_spec(name: str) -> QueueSpec:
    return next(q for q in QUEUES if q.name == name)
