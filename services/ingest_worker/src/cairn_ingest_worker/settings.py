import os
import socket
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints
from pydantic_settings import SettingsConfigDict

from cairn_runtime.settings import ServiceSettings


class BoundSecret(BaseModel):
    """A secret that may be sent only to `hosts` ("api.example.com" or "*.example.com") and, if
    `tenants` is given, named only by those tenants' jobs (the workers are shared: a tenant's API
    credential must not read that API for another tenant)."""

    model_config = ConfigDict(extra="forbid")

    value: SecretStr
    hosts: list[Annotated[str, StringConstraints(pattern=r"^(\*\.)?[A-Za-z0-9.-]{1,253}$")]] = Field(min_length=1)
    tenants: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]] | None = Field(None, min_length=1)


class WorkerSettings(ServiceSettings):
    """Every field is `CAIRN_<FIELD>` in the environment; durations in seconds."""

    # A bad CAIRN_SECRETS entry fails the start, and pydantic would print the input of every
    # failed union arm (the whole {"value": ...} object) into the log: errors name field and rule only.
    model_config = SettingsConfigDict(**ServiceSettings.model_config, hide_input_in_errors=True)

    service_name: str = "ingest-worker"
    worker_concurrency: int = Field(2, ge=1, le=64)
    worker_task_events: bool = Field(
        False, description="Send Celery task events (Flower's task list); worker heartbeats are sent either way"
    )
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
    # holds one: CAIRN_SECRETS='{"example_api": {"value": "Bearer abc...", "hosts": ["api.example.com"]}}'
    # (bound: sent to those hosts only, whoever submits the job) or '{"example_api": "Bearer abc..."}'
    # (unbound: any submitter may send it to any host; a warning at start). SecretStr keeps them
    # out of reprs and logs; a pipeline reads one through `RunContext.secret(name, hosts=...)`.
    secrets: dict[str, SecretStr | BoundSecret] = Field(default_factory=dict, description="Named secrets of pipelines (JSON object)")
    http_allow_private_networks: bool = Field(
        False, description="Let pipelines' HTTP reach loopback, private and link-local addresses (cairn_runtime.egress)"
    )
    # TEST ONLY: an importable module that registers test pipelines when imported
    # (`register_pipeline`); the end-to-end suite sets it (tests-e2e/harness.py). Never in production.
    test_pipeline_module: str | None = None

    def secret_values(self) -> dict[str, str]:
        """name -> the secret's value (for `RunContext.secrets`)."""
        return {name: (secret.value if isinstance(secret, BoundSecret) else secret).get_secret_value() for name, secret in self.secrets.items()}

    def secret_tenants(self) -> dict[str, frozenset[str]]:
        """name -> the tenants whose jobs may name a secret bound to tenants (others absent)."""
        return {
            name: frozenset(secret.tenants)
            for name, secret in self.secrets.items()
            if isinstance(secret, BoundSecret) and secret.tenants is not None
        }

    def secret_hosts(self) -> dict[str, frozenset[str]]:
        """name -> the hosts a bound secret may go to (unbound secrets absent)."""
        return {name: frozenset(h.lower() for h in secret.hosts) for name, secret in self.secrets.items() if isinstance(secret, BoundSecret)}

    @property
    def soft_time_limit_s(self) -> float:
        """Celery's soft time limit of one task delivery: a full slice plus one batch's bound."""
        return self.task_slice_s + self.batch_time_limit_s

    @property
    def time_limit_s(self) -> float:
        """Celery's hard time limit: the pool process is killed (and replaced) past it."""
        return self.soft_time_limit_s + self.hard_time_limit_grace_s
