import os
import socket

from pydantic import Field, SecretStr

from cairn_runtime.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """Every field is `CAIRN_<FIELD>` in the environment; durations in seconds."""

    service_name: str = "ingest-worker"
    worker_concurrency: int = Field(2, ge=1, le=64)
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    lease_ttl_s: float = Field(30.0, gt=0, description="A lease not renewed for this long may be taken over")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    task_slice_s: float = Field(
        600.0, gt=0, description="Longest run of one task delivery; well under RabbitMQ's consumer_timeout (30 min)"
    )
    batch_time_limit_s: float = Field(
        120.0,
        gt=0,
        description="Longest one batch (read, clean, store) may run: past it the heartbeat stops renewing the lease, "
        "and the task's soft time limit (task_slice_s + this) interrupts it as a retryable BatchTimedOut",
    )
    hard_time_limit_grace_s: float = Field(
        30.0, gt=0, description="After the soft time limit, the pool kills a task that is still running this much later"
    )
    store_retry_base_s: float = Field(0.5, gt=0, description="First delay of a task retried because MongoDB is unreachable")
    store_retry_max_s: float = Field(5.0, gt=0, description="Ceiling of that delay (exponential, full jitter)")
    max_task_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="A task message with a larger body is dead-lettered without being parsed"
    )
    max_attempts: int = Field(5, ge=1, description="Attempts of a shard before it is dead-lettered")
    retry_base_delay_s: float = Field(1.0, ge=0)
    retry_max_delay_s: float = Field(60.0, ge=0)
    # Credentials pipelines name in their params (http_json `auth_secret`), so a job spec never
    # holds one: CAIRN_SECRETS='{"example_api": "Bearer abc..."}'. SecretStr keeps them out of
    # reprs and logs; a pipeline reads one through `RunContext.secret(name)`.
    secrets: dict[str, SecretStr] = Field(default_factory=dict, description="Named secrets of pipelines (JSON object)")
    # TEST ONLY: an importable module that registers test pipelines when imported
    # (`register_pipeline`); the end-to-end suite sets it (tests-e2e/harness.py). Never in production.
    test_pipeline_module: str | None = None

    @property
    def soft_time_limit_s(self) -> float:
        """Celery's soft time limit of one task delivery: a full slice plus one batch's bound."""
        return self.task_slice_s + self.batch_time_limit_s

    @property
    def time_limit_s(self) -> float:
        """Celery's hard time limit: the pool process is killed (and replaced) past it."""
        return self.soft_time_limit_s + self.hard_time_limit_grace_s
