"""Every message that crosses an exchange. Each carries its schema version in the body, and
knows its own route: `message.route()` is the (exchange, routing key) it is published with, so
no publisher call site names one (docs/architecture.md maps every message).

A consumer validates the body against the model named here; a body that does not validate is
dead-lettered with the validation error as its reason, never half-processed.
"""

import re
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cairn_contracts.bounds import ContractModel
from cairn_contracts.clock import utcnow
from cairn_contracts.jobs import JobSpec
from cairn_contracts.topology import (
    EXCHANGE_COMMANDS,
    EXCHANGE_DEFAULT,
    EXCHANGE_DLX,
    EXCHANGE_EVENTS,
    QUEUE_INGEST,
    ROUTING_CANCEL_JOB,
    ROUTING_DLQ_DISCARD,
    ROUTING_DLQ_REPLAY,
    ROUTING_SHARD_CANCELLED,
    ROUTING_SHARD_FAILED,
    ROUTING_SHARD_SUCCEEDED,
    ROUTING_START_JOB,
    Route,
)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    message_type: ClassVar[str]
    schema_version: int

    def route(self) -> Route:
        """The exchange and routing key this message is published with (computed from the body
        where a type has several keys: a shard outcome, a dead letter's source queue)."""
        raise NotImplementedError(f"{type(self).__name__} declares no route")


class StartJob(Message):
    """Command gateway → scheduler: plan this recorded job into shards and dispatch them."""

    message_type: ClassVar[str] = "cairn.command.start_job"
    schema_version: Literal[1] = 1
    job_id: str
    tenant: str
    spec: JobSpec
    submitted_at: datetime = Field(default_factory=utcnow)

    def route(self) -> Route:
        return Route(EXCHANGE_COMMANDS, ROUTING_START_JOB)


class CancelJob(Message):
    """Command gateway → scheduler: stop this job. Cooperative: shards that have not started are
    cancelled, running ones stop at their next batch boundary. The job is marked
    `cancel_requested` in MongoDB before this is published, so a lost command is made up for by
    the scheduler's periodic sweep; handling it twice changes nothing. A sender must mark first:
    the scheduler ignores the command for a job that is not marked (a job deleted and submitted
    again under the same id since the command was sent)."""

    message_type: ClassVar[str] = "cairn.command.cancel_job"
    schema_version: Literal[1] = 1
    job_id: str
    tenant: str
    requested_by: str | None = Field(None, max_length=200)
    requested_at: datetime = Field(default_factory=utcnow)

    def route(self) -> Route:
        return Route(EXCHANGE_COMMANDS, ROUTING_CANCEL_JOB)


class RunShard(Message, ContractModel):  # its ids reach queries: storable text only
    """Celery task payload scheduler → ingest worker. The shard document is authoritative.

    Its message type is the Celery task name the worker registers (`contracts.tasks`); it is sent
    as a Celery task (kwargs = this body) by `cairn_runtime.celery_config.ShardTaskSender`."""

    message_type: ClassVar[str] = "cairn.ingest.run_shard"
    schema_version: Literal[1] = 1
    job_id: str
    shard_key: str

    def route(self) -> Route:
        return Route(EXCHANGE_DEFAULT, QUEUE_INGEST)  # the route Celery sends it by


# Most shards one RunShards task carries (the scheduler's bundles: cairn_scheduler/bundles.py).
MAX_BUNDLE_SHARDS = 64


class RunShards(Message, ContractModel):
    """Celery task payload scheduler → ingest worker: run these shards of one job, in order, in
    one task (a bundle of small shards; each is still claimed, checkpointed, fenced and finished
    as its own shard). The shard documents are authoritative."""

    message_type: ClassVar[str] = "cairn.ingest.run_shards"  # also its Celery task name
    schema_version: Literal[1] = 1
    job_id: str
    shard_keys: list[str] = Field(min_length=1, max_length=MAX_BUNDLE_SHARDS)

    @field_validator("shard_keys")
    @classmethod
    def _of_the_job(cls, keys: list[str], info: ValidationInfo) -> list[str]:
        job_id = info.data.get("job_id")
        if job_id is not None:
            own = re.compile(re.escape(job_id) + r":\d+")
            if any(not own.fullmatch(key) for key in keys):
                raise ValueError("every shard key of a bundle is one of its job's (<job id>:<index>)")
        if len(set(keys)) != len(keys):
            raise ValueError("a bundle names each shard once")
        return keys

    def route(self) -> Route:
        return Route(EXCHANGE_DEFAULT, QUEUE_INGEST)  # the route Celery sends it by


class RunFrontier(Message, ContractModel):
    """Celery task payload scheduler → ingest worker: pull and run this job's work items by
    lease until none is claimable (lease-frontier sharding). `lane` tells runners apart."""

    message_type: ClassVar[str] = "cairn.ingest.run_frontier"  # also its Celery task name
    schema_version: Literal[1] = 1
    job_id: str
    lane: int

    def route(self) -> Route:
        return Route(EXCHANGE_DEFAULT, QUEUE_INGEST)  # the route Celery sends it by


class ShardFinished(Message):
    """Event ingest worker → scheduler: a shard reached a terminal state."""

    message_type: ClassVar[str] = "cairn.event.shard_finished"
    schema_version: Literal[1] = 1
    job_id: str
    shard_key: str
    outcome: Literal["succeeded", "failed", "cancelled"]
    records_done: int
    error: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)

    def route(self) -> Route:
        """One routing key per outcome (the events queues bind `shard.*`)."""
        keys = {"succeeded": ROUTING_SHARD_SUCCEEDED, "failed": ROUTING_SHARD_FAILED, "cancelled": ROUTING_SHARD_CANCELLED}
        return Route(EXCHANGE_EVENTS, keys[self.outcome])


# unknown_shard: a task naming a shard that is not recorded (a stale or forged task).
DeadLetterReason = Literal["non_retryable", "retries_exhausted", "contract_violation", "poison", "unknown_shard"]


class OriginalMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    body: str
    body_encoding: Literal["utf-8", "base64"] = "utf-8"
    headers: dict[str, Any] = Field(default_factory=dict)
    routing_key: str | None = None


class DeadLetter(Message):
    """Published to the dead-letter exchange by a service that gives up on a message.

    Messages the broker itself dead-letters (rejected, expired) reach the DLQ in their original
    form with `x-death` headers instead; the DLQ handler records both kinds.
    """

    message_type: ClassVar[str] = "cairn.dead_letter"
    schema_version: Literal[1] = 1
    dead_letter_id: str
    source_service: str
    source_queue: str
    reason: DeadLetterReason
    error_type: str
    error_message: str
    stack: str | None = Field(None, description="Bounded stack summary")
    job_id: str | None = None
    shard_key: str | None = None
    attempts: int = 0
    original: OriginalMessage
    dead_lettered_at: datetime = Field(default_factory=utcnow)

    def route(self) -> Route:
        """To the dead-letter exchange, keyed by the queue the message came from (the DLQ binds `#`)."""
        return Route(EXCHANGE_DLX, self.source_queue)


DeadLetterAction = Literal["replay", "discard"]


class DeadLetterCommand(Message):
    """Command gateway → DLQ handler: replay or discard one recorded dead letter (task_errors).

    `command_id` tells two requests apart: a redelivered command continues its own replay, while
    a second replay of an entry that is already replaying is refused (the work never runs twice
    at once).
    """

    message_type: ClassVar[str] = "cairn.command.dead_letter"
    schema_version: Literal[1] = 1
    command_id: str
    action: DeadLetterAction
    dead_letter_id: str
    requested_by: str = Field(..., min_length=1, max_length=200, description="Who asked (operator name)")
    api_key_id: str | None = Field(None, max_length=64, description="The API key the request came with")
    note: str | None = Field(None, max_length=2000)
    requested_at: datetime = Field(default_factory=utcnow)

    def route(self) -> Route:
        return Route(EXCHANGE_COMMANDS, ROUTING_DLQ_REPLAY if self.action == "replay" else ROUTING_DLQ_DISCARD)
