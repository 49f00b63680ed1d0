"""The scheduler's Prometheus metrics: the system's state as gauges (queue depths from the broker,
jobs and shards by state from MongoDB, computed by `gauges.GaugeCollector`), job durations, and
the leases its reaper reclaimed."""

from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram

from cairn_contracts import clock

QUEUE_MESSAGES = Gauge("cairn_queue_messages", "Messages ready in a queue (the broker's count)", ["queue"])
QUEUE_CONSUMERS = Gauge("cairn_queue_consumers", "Consumers of a queue (the broker's count)", ["queue"])
JOBS = Gauge("cairn_jobs", "Jobs by state (MongoDB)", ["state"])
SHARDS = Gauge("cairn_shards", "Shards by state (MongoDB)", ["state"])
OLDEST_QUEUED_SHARD_AGE = Gauge(
    "cairn_oldest_queued_shard_age_seconds", "Age of the oldest shard waiting in QUEUED (0 when none waits)"
)
JOB_SECONDS = Histogram(
    "cairn_job_duration_seconds",
    "A job from its submission until its last shard was terminal",
    ["pipeline", "state"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
LEASE_RECLAIMS = Counter(
    "cairn_lease_reclaims_total", "Shards whose holder's lease had expired, returned to ready (by the reaper)"
)
SHARD_REDISPATCHES = Counter(
    "cairn_shard_redispatches_total",
    "Tasks the scheduler sent again for shards already planned, by reason: `retry_due` (a retry's"
    " time came), `lost_task` (a QUEUED shard's task was provably lost)",
    ["reason"],
)
GAUGE_PASSES = Counter("cairn_gauge_collections_total", "Passes of the gauge collector", ["outcome"])


def observe_job_finished(job: dict, state: str, finished_at: datetime) -> None:
    """Observe a job that just became terminal (call once: where the terminal write matched)."""
    created_ms = clock.stored_ms(job.get("created_at"))
    if created_ms is not None:
        JOB_SECONDS.labels(str(job.get("pipeline") or "unknown"), state).observe(max(0.0, finished_at.timestamp() - created_ms / 1000))
