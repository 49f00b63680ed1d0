"""Job and shard states, the named sets of them every service queries by, and the priorities
clients may ask for.

The sets are frozensets (membership tests); a MongoDB `$in`/`$nin` takes `state_values(SET)`.
"""

from collections.abc import Iterable
from enum import IntEnum, StrEnum


class JobState(StrEnum):
    """A job's state as the API reports it (Celery's vocabulary, which clients already know)."""

    # Recorded with `after`: waits for its dependencies (cairn_contracts.workflows); then PENDING,
    # or FAILURE/CANCELLED when one of them did not succeed (its `on_dependency_failure`).
    WAITING = "WAITING"
    PENDING = "PENDING"  # recorded, command not yet planned into shards
    STARTED = "STARTED"  # planned; shards queued or running
    RETRY = "RETRY"  # at least one shard waits for a retry, none failed for good
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"  # cancelled: every shard terminal, at least one CANCELLED
    # Reported by the API only, never stored: a cancel was requested (`cancel_requested` on the
    # job) and its running shards have not all stopped yet; the stored state stays the roll-up's.
    CANCELLING = "CANCELLING"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED})
# Not finished: a cancel applies, an identical job is refused, the result is not there yet.
ACTIVE_JOB_STATES = frozenset({JobState.WAITING, JobState.PENDING, JobState.STARTED, JobState.RETRY})


class ShardState(StrEnum):
    PLANNED = "PLANNED"  # recorded by the planner, its task not yet confirmed by the broker
    QUEUED = "QUEUED"  # its task is on the ingest queue
    RUNNING = "RUNNING"  # a worker holds its lease
    RETRY = "RETRY"  # failed with a retryable error; its retry task is queued
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # dead-lettered
    CANCELLED = "CANCELLED"  # its job was cancelled: never started, or stopped at a batch boundary

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_SHARD_STATES


TERMINAL_SHARD_STATES = frozenset({ShardState.SUCCEEDED, ShardState.FAILED, ShardState.CANCELLED})
# Not running and not finished: waiting for a worker (first run or a retry). A worker may claim
# such a shard; a cancel stops it outright, without waiting for a batch boundary.
WAITING_SHARD_STATES = frozenset({ShardState.PLANNED, ShardState.QUEUED, ShardState.RETRY})


def state_values(states: Iterable[StrEnum]) -> list[str]:
    """The states as the list of plain strings a MongoDB `$in`/`$nin` takes (sorted, so the same
    set always gives the same query)."""
    return sorted(str(state) for state in states)


class DeadLetterStatus(StrEnum):
    """A task_errors entry's life: waiting for an operator, being replayed, closed."""

    OPEN = "open"  # recorded; may be replayed or discarded
    REPLAYING = "replaying"  # a replay re-dispatched its shard; the outcome is not known yet
    REPLAYED = "replayed"  # the replay ended; `replay.outcome` says how
    DISCARDED = "discarded"  # closed by an operator without replay (kept for audit)


class ReplayOutcome(StrEnum):
    SUCCEEDED = "succeeded"  # the replayed shard finished
    FAILED_AGAIN = "failed_again"  # it failed again: a new entry (`superseded_by`) holds that failure
    REFUSED = "refused"  # nothing was re-dispatched (the entry or its shard was not in a replayable state)


class Priority(IntEnum):
    """Maps one to one onto RabbitMQ message priorities (queues declare x-max-priority 4)."""

    LOW = 1
    NORMAL = 2
    HIGH = 3
    CRITICAL = 4
