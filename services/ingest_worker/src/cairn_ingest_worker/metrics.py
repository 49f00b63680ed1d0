"""The worker's Prometheus metrics (multiprocess-safe: prefork children write to
PROMETHEUS_MULTIPROC_DIR and the main process serves the merged figures).

Counters and histograms are summed over every process that ever wrote them (a recycled or killed
child's counts stay); the gauge is `livesum`: only live processes count (see
`cairn_runtime.metrics.reap_dead_processes`). The publish-confirm histogram is the runtime's.
"""

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cairn_ingest_worker.store import WriteCounts

RECORDS = Counter("cairn_records_processed_total", "Records read, cleaned and stored", ["pipeline"])
RECORDS_REDONE = Counter("cairn_records_redone_total", "Records of a re-run batch that were already stored", ["pipeline"])
# By the sink's outcome (write modes): inserted, updated, unchanged, duplicate.
RECORDS_STORED = Counter("cairn_records_stored_total", "Records stored by the sink, by outcome", ["pipeline", "outcome"])
BATCHES = Counter("cairn_batches_total", "Batches stored and checkpointed", ["pipeline"])
SHARD_OUTCOMES = Counter("cairn_shard_runs_total", "Shard runs by outcome", ["pipeline", "outcome"])
FAILURES = Counter("cairn_failures_total", "Shard failures by error type", ["pipeline", "error_type", "retryable"])
BATCH_SECONDS = Histogram(
    "cairn_batch_duration_seconds", "Read, clean, store and checkpoint of one batch", ["pipeline"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("cairn_shard_retries_total", "Shard runs that failed and were re-sent for a retry", ["pipeline"])
# A lease reclaim seen from the worker: its claim took a shard over from an expired lease (the
# scheduler's reaper counts the reclaims it makes as cairn_lease_reclaims_total).
LEASE_TAKEOVERS = Counter(
    "cairn_lease_takeovers_total", "Shards a worker claimed from a holder whose lease had expired"
)
QUEUE_WAIT_SECONDS = Histogram(
    "cairn_task_queue_wait_seconds",
    "From a shard task's send (or, for a delayed retry, its due time) until a worker starts it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
SHARD_RUN_SECONDS = Histogram(
    "cairn_shard_run_duration_seconds",
    "One delivery of a shard task, start to end, by what it ended with",
    ["task", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
TASKS_RUNNING = Gauge(
    "cairn_worker_tasks_running", "Shard tasks in progress in live worker processes", multiprocess_mode="livesum"
)


def observe_write(pipeline: str, counts: "WriteCounts") -> None:
    """Add one batch's sink outcome to `cairn_records_stored_total`."""
    for outcome in ("inserted", "updated", "unchanged", "duplicate"):
        value = getattr(counts, outcome)
        if value:
            RECORDS_STORED.labels(pipeline, outcome).inc(value)
