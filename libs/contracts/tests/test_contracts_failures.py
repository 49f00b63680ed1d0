"""Contracts of failure handling: retry policy in the job spec, DLQ commands, their queues."""

import pytest
from pydantic import ValidationError

from cairn_contracts import store, topology
from cairn_contracts.jobs import JOB_SPEC_ADAPTER, RetryPolicy
from cairn_contracts.messages import DeadLetterCommand
from cairn_contracts.states import DeadLetterStatus, ReplayOutcome

SPEC = JOB_SPEC_ADAPTER


def test_a_job_without_a_retry_policy_leaves_it_to_the_pipeline_and_the_worker() -> None:
    assert SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}}).retry is None


def test_a_job_may_set_any_part_of_its_retry_policy() -> None:
    spec = SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}, "retry": {"max_attempts": 7}})

    assert spec.retry == RetryPolicy(max_attempts=7)
    assert spec.retry.base_delay_s is None and spec.retry.max_delay_s is None


@pytest.mark.parametrize(
    ("retry", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"base_delay_s": -1}, "base_delay_s"),
        ({"max_delay_s": 90_000}, "max_delay_s"),
        ({"tries": 3}, "tries"),
    ],
)
def test_retry_policy_fields_are_bounded(retry: dict, field: str) -> None:
    with pytest.raises(ValidationError) as error:
        SPEC.validate_python({"pipeline": "synthetic", "params": {"count": 1}, "retry": retry})
    assert any(field in map(str, e["loc"]) for e in error.value.errors()), error.value


def test_max_delay_may_not_be_below_the_base_delay() -> None:
    with pytest.raises(ValidationError, match="max_delay_s"):
        RetryPolicy(base_delay_s=10, max_delay_s=1)
    assert RetryPolicy(base_delay_s=1, max_delay_s=1).max_delay_s == 1


def test_a_dead_letter_command_round_trips_and_its_action_is_a_closed_set() -> None:
    command = DeadLetterCommand(command_id="c1", action="replay", dead_letter_id="dl-1", requested_by="default")

    assert DeadLetterCommand.model_validate_json(command.model_dump_json()) == command
    with pytest.raises(ValidationError):
        DeadLetterCommand(command_id="c1", action="delete", dead_letter_id="dl-1", requested_by="default")
    with pytest.raises(ValidationError):
        DeadLetterCommand(command_id="c1", action="replay", dead_letter_id="dl-1", requested_by="")


def test_dead_letter_commands_reach_the_dlq_handler_queue_which_dead_letters_to_the_dlx() -> None:
    spec = topology.queue_spec(topology.QUEUE_DLQ_COMMANDS)

    assert (topology.EXCHANGE_COMMANDS, topology.ROUTING_DLQ_REPLAY) in spec.bindings
    assert (topology.EXCHANGE_COMMANDS, topology.ROUTING_DLQ_DISCARD) in spec.bindings
    assert spec.arguments["x-dead-letter-exchange"] == topology.EXCHANGE_DLX
    # a replay command never lands on the scheduler's queue, nor a start command on this one
    assert all(key != topology.ROUTING_START_JOB for _, key in spec.bindings)
    assert all(key not in (topology.ROUTING_DLQ_REPLAY, topology.ROUTING_DLQ_DISCARD)
               for _, key in topology.queue_spec(topology.QUEUE_SCHEDULER_COMMANDS).bindings)


def test_the_dlq_handler_hears_every_shard_outcome() -> None:
    spec = topology.queue_spec(topology.QUEUE_DLQ_EVENTS)

    assert spec.bindings == ((topology.EXCHANGE_EVENTS, "shard.*"),)
    assert spec.arguments["x-dead-letter-exchange"] == topology.EXCHANGE_DLX


def test_dead_letter_statuses_and_outcomes() -> None:
    assert [s.value for s in DeadLetterStatus] == ["open", "replaying", "replayed", "discarded"]
    assert {o.value for o in ReplayOutcome} == {"succeeded", "failed_again", "refused"}


def test_task_errors_are_indexed_for_the_dlq_api_and_settling() -> None:
    keys = {spec.keys for spec in store.INDEXES if spec.collection == store.TASK_ERRORS}

    assert (("status", 1), ("created_at", 1)) in keys
    assert (("shard_key", 1), ("status", 1)) in keys
    assert store.STATUS_CACHE_KEY.format(prefix="p", tenant="t", job_id="j") == "p:status:t:j"
