"""Job and shard states, and the priorities clients may ask for."""

from enum import IntEnum, StrEnum


class JobState(StrEnum):
    """A job's state as the API reports it (Celery's vocabulary, which clients already know)."""

    PENDING = "PENDING"  # recorded, command not yet planned into shards
    STARTED = "STARTED"  # planned; shards queued or running
    RETRY = "RETRY"  # at least one shard waits for a retry, none failed for good
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCESS, JobState.FAILURE})


class ShardState(StrEnum):
    PLANNED = "PLANNED"  # recorded by the planner, its task not yet confirmed by the broker
    QUEUED = "QUEUED"  # its task is on the ingest queue
    RUNNING = "RUNNING"  # a worker holds its lease
    RETRY = "RETRY"  # failed with a retryable error; its retry task is queued
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # dead-lettered

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_SHARD_STATES


TERMINAL_SHARD_STATES = frozenset({ShardState.SUCCEEDED, ShardState.FAILED})


class Priority(IntEnum):
    """Maps one to one onto RabbitMQ message priorities (queues declare x-max-priority 4)."""

    LOW = 1
    NORMAL = 2
    HIGH = 3
    CRITICAL = 4
