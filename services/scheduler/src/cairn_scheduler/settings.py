from pydantic import Field, SecretStr

from cairn_runtime.settings import ServiceSettings


class SchedulerSettings(ServiceSettings):
    service_name: str = "scheduler"
    reconcile_interval_s: float = Field(5.0, gt=0, description="How often leases are reaped and running jobs rolled up again")
    relay_after_s: float = Field(10.0, gt=0, description="Republish a job's command if unpublished this long")
    redispatch_after_s: float = Field(
        60.0, gt=0, description="A QUEUED shard whose task is provably lost is re-sent once it waited this long"
    )
    lost_task_passes: int = Field(
        2, ge=2, description="Consecutive maintenance passes that must see the ingest queue empty before a task counts as lost"
    )
    retry_poll_max_s: float = Field(
        1.0, gt=0, description="Longest sleep of the due-retry dispatcher (it sleeps until the next due retry, at most this)"
    )
    # Deliveries handled at once (commands, events, control): shard events are counted in batches
    # of what is delivered (consumer.Batched, at most 64), so this bounds a batch.
    prefetch: int = Field(64, ge=1)
    gauges_interval_s: float = Field(15.0, gt=0, description="How often queue depths and job/shard counts are refreshed")
    # The task API (issue 5): schedules, cancel sweep, result retention.
    schedule_tick_s: float = Field(1.0, gt=0, description="How often due schedules are looked for")
    result_ttl_s: float = Field(7 * 86_400, gt=0, description="A finished job's result is dropped this long after it finished")
    # Fair dispatch across tenants (issue 15, fairness.py).
    tenant_max_in_flight_shards: int | None = Field(
        64, ge=1, description="Shard tasks (a bundle of small shards is one) one tenant may have queued or running at once, unless its quotas say (None: no cap)"
    )
    # A tenant's quotas where the scheduler records or releases its jobs (schedules.py: running
    # jobs; workflows.py: a params_from job's per-job quotas): the gateway's settings of the same
    # names (one environment variable for both).
    tenant_max_running_jobs: int | None = Field(100, ge=0, description="Unfinished jobs per tenant at once: a schedule's run over it is skipped (None: no limit)")
    tenant_max_shards_per_job: int | None = Field(None, ge=1, description="Shards or work items per job (None: only the plan bound)")
    tenant_max_records_per_job: int | None = Field(None, ge=1, description="Key-space size per job (None: no limit)")
    max_in_flight_shards: int | None = Field(
        None, ge=1, description="Shard tasks queued or running across all tenants (None: no limit; about the workers' total concurrency)"
    )
    fair_dispatch_interval_s: float = Field(1.0, gt=0, description="How often waiting shards are dispatched besides on shard events")
    max_bundle_shards: int = Field(
        64, ge=1, le=64, description="Small shards (one batch or less) sent per task, in bundles of about one batch of records; 1: a task per shard"
    )
    fair_refill_interval_s: float = Field(
        0.1, ge=0, description="Shortest time between the dispatch passes shard events start (0: one per event); fairness.py"
    )
    # Webhooks (webhooks.py): a finished job's callback URL is POSTed a signed body.
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the Cairn-Signature header; unset: deliveries wait (logged) until it is set"
    )
    webhook_poll_s: float = Field(1.0, gt=0, description="How often finished jobs are looked for and due deliveries sent")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Per delivery attempt (connect + response)")
    webhook_max_attempts: int = Field(10, ge=1, le=50, description="Attempts before a delivery is given up (state failed)")
    webhook_base_delay_s: float = Field(10.0, gt=0, description="Backoff before the 2nd attempt; doubles each attempt")
    webhook_max_delay_s: float = Field(3600.0, gt=0, description="Longest backoff between attempts")
    webhook_allow_private_networks: bool = Field(
        False, description="Deliver to hosts resolving to loopback/private/link-local addresses (SSRF guard off: tests, trusted networks)"
    )
    webhook_proxy: str | None = Field(None, description="Send deliveries through this egress proxy (recommended in production)")
