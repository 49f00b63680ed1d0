"""Every message survives a JSON round trip and carries its schema version."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from cairn_contracts import topology
from cairn_contracts.jobs import JOB_SPEC_ADAPTER
from cairn_contracts.messages import (
    CancelJob,
    DeadLetter,
    DeadLetterCommand,
    Message,
    OriginalMessage,
    RunFrontier,
    RunShard,
    ShardFinished,
    StartJob,
)
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD

SPEC = JOB_SPEC_ADAPTER

START = StartJob(
    job_id="job-1",
    tenant="default",
    spec=SPEC.validate_python(
        {"pipeline": "mongo_range", "params": {"collection": "src", "start": 0, "end": 100, "fields": ["a"]}, "priority": 3}
    ),
    submitted_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
)
MESSAGES: list[Message] = [
    START,
    RunShard(job_id="job-1", shard_key="job-1:0000"),
    ShardFinished(job_id="job-1", shard_key="job-1:0001", outcome="failed", records_done=3, error="boom"),
    DeadLetter(
        dead_letter_id="dl-1",
        source_service="scheduler",
        source_queue="cairn.scheduler.commands",
        reason="contract_violation",
        error_type="ContractViolation",
        error_message="bad",
        original=OriginalMessage(body="{}", headers={"x-death": [{"count": 1}]}, routing_key="job.start"),
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_json(message: Message) -> None:
    text = message.model_dump_json()

    assert type(message).model_validate_json(text) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_body_carries_schema_version_1(message: Message) -> None:
    assert '"schema_version":1' in message.model_dump_json()


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_rejects_an_unknown_schema_version(message: Message) -> None:
    body = message.model_dump(mode="json") | {"schema_version": 2}

    with pytest.raises(ValidationError) as caught:
        type(message).model_validate(body)
    assert caught.value.errors()[0]["loc"] == ("schema_version",)


def test_message_types_are_distinct() -> None:
    types = [type(m).message_type for m in MESSAGES]

    assert len(set(types)) == len(types)
    assert all(t.startswith("cairn.") for t in types)


def test_start_job_keeps_the_spec_pipeline_through_the_round_trip() -> None:
    again = StartJob.model_validate_json(START.model_dump_json())

    assert again.spec.pipeline == "mongo_range"
    assert again.spec.params["fields"] == ["a"]
    assert again.submitted_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_messages_forbid_extra_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        RunShard.model_validate({"job_id": "j", "shard_key": "j:0000", "schema_version": 1, "extra": 1})
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


def test_shard_finished_outcome_is_a_closed_set() -> None:
    with pytest.raises(ValidationError):
        ShardFinished(job_id="j", shard_key="k", outcome="maybe", records_done=0)  # type: ignore[arg-type]


def test_dead_letter_reason_is_a_closed_set() -> None:
    body = MESSAGES[3].model_dump(mode="json") | {"reason": "bored"}

    with pytest.raises(ValidationError):
        DeadLetter.model_validate(body)


def test_invalid_json_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        RunShard.model_validate_json(b"not json")


def test_run_frontier_round_trips() -> None:
    message = RunFrontier(job_id="job-1", lane=3)

    assert RunFrontier.model_validate_json(message.model_dump_json()) == message
    assert RunFrontier.message_type not in {type(m).message_type for m in MESSAGES}


ROUTED: list[tuple[Message, set[str]]] = [
    (START, {topology.QUEUE_SCHEDULER_COMMANDS}),
    (CancelJob(job_id="job-1", tenant="default"), {topology.QUEUE_SCHEDULER_CONTROL}),
    (RunShard(job_id="job-1", shard_key="job-1:0000"), {topology.QUEUE_INGEST}),
    (RunFrontier(job_id="job-1", lane=0), {topology.QUEUE_INGEST}),
    *[
        (
            ShardFinished(job_id="job-1", shard_key="job-1:0000", outcome=outcome, records_done=0),
            {topology.QUEUE_SCHEDULER_EVENTS, topology.QUEUE_DLQ_EVENTS},
        )
        for outcome in ("succeeded", "failed", "cancelled")
    ],
    (MESSAGES[3], {topology.QUEUE_DLQ}),
    *[
        (
            DeadLetterCommand(command_id="c-1", action=action, dead_letter_id="dl-1", requested_by="ops"),
            {topology.QUEUE_DLQ_COMMANDS},
        )
        for action in ("replay", "discard")
    ],
]


def _matches(pattern: str, key: str) -> bool:
    """AMQP topic matching, enough for Cairn's bindings (`*` one word, `#` any words)."""
    if pattern == "#":
        return True
    words, keys = pattern.split("."), key.split(".")
    return len(words) == len(keys) and all(w in ("*", k) for w, k in zip(words, keys, strict=False))


def _queues_reached(route: topology.Route) -> set[str]:
    if route.exchange == topology.EXCHANGE_DEFAULT:  # the default exchange routes by queue name
        return {queue.name for queue in topology.QUEUES if queue.name == route.routing_key}
    return {
        queue.name
        for queue in topology.QUEUES
        for exchange, key in queue.bindings
        if exchange == route.exchange and _matches(key, route.routing_key)
    }


@pytest.mark.parametrize("message, queues", ROUTED, ids=lambda m: type(m).__name__ if isinstance(m, Message) else "")
def test_every_message_route_reaches_its_consumers_queues(message: Message, queues: set[str]) -> None:
    assert _queues_reached(message.route()) == queues


def test_shard_finished_routing_key_names_the_outcome() -> None:
    keys = {m.route().routing_key for m, _ in ROUTED if isinstance(m, ShardFinished)}

    assert keys == {topology.ROUTING_SHARD_SUCCEEDED, topology.ROUTING_SHARD_FAILED, topology.ROUTING_SHARD_CANCELLED}


def test_dead_letter_is_keyed_by_its_source_queue() -> None:
    assert MESSAGES[3].route() == topology.Route(topology.EXCHANGE_DLX, "cairn.scheduler.commands")


def test_celery_task_names_are_the_payload_message_types() -> None:
    assert TASK_RUN_SHARD == RunShard.message_type == "cairn.ingest.run_shard"
    assert TASK_RUN_FRONTIER == RunFrontier.message_type == "cairn.ingest.run_frontier"
