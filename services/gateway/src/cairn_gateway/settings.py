from pydantic import Field

from cairn_runtime.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    service_name: str = "gateway"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    status_cache_ttl_s: int = Field(300, ge=0, description="Cache of finished jobs' status in Redis (0: off)")
    # The task API (issue 5): keys, limits, duplicates, result retention.
    rate_limit_per_minute: int = Field(600, ge=0, description="Requests per minute per API key (0: no limit)")
    max_body_bytes: int = Field(1_048_576, ge=0, description="Largest request body (413 above; 0: no limit)")
    auth_cache_ttl_s: float = Field(10.0, ge=0, description="How long a looked-up API key is trusted (revocations wait this long)")
    job_lock_ttl_s: int = Field(86_400, ge=0, description="Longest hold of the lock per job fingerprint (0: no lock)")
    # Tenancy (issue 15): the quotas of a tenant an operator has not configured (PUT /v1/tenants/{t}).
    tenant_max_running_jobs: int | None = Field(100, ge=0, description="Unfinished jobs per tenant at once (None: no limit)")
    tenant_max_shards_per_job: int | None = Field(None, ge=1, description="Shards or work items per job (None: only the plan bound)")
    tenant_max_records_per_job: int | None = Field(None, ge=1, description="Key-space size per job (None: no limit)")
    result_ttl_s: int = Field(7 * 86_400, ge=1, description="A finished job's result is kept this long (then 410 Gone)")
    # Dependencies down or slow (issue 11): every client call is bounded, so a request answers.
    redis_timeout_s: float = Field(1.0, gt=0, description="Redis connect and read timeout (a hung Redis is a Redis down)")
    redis_max_connections: int = Field(64, ge=1, description="Redis connection pool size of one gateway process")
    redis_pool_timeout_s: float = Field(5.0, gt=0, description="Longest wait for a free Redis connection when the pool is busy")
    mongodb_server_selection_timeout_ms: int = Field(2000, ge=100, description="How long a request waits for MongoDB before 503")
    mongodb_operation_timeout_ms: int = Field(
        5000, ge=100, description="Longest one MongoDB operation of a request may take (a stalled server: 503 past it)"
    )
    broker_retry_max_s: float = Field(30.0, gt=0, description="Longest wait between attempts to reach RabbitMQ")
    # Worker control (issue 16): Celery remote control over the broker.
    worker_control_timeout_s: float = Field(
        1.0, gt=0, le=30, description="How long a worker-control call collects the workers' replies (seconds)"
    )
    worker_heartbeats: bool = Field(True, description="Follow the workers' heartbeat events (the worker list's heartbeat age)")
