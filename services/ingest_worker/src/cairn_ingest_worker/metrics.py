"""The worker's Prometheus metrics (multiprocess-safe: prefork children write to
PROMETHEUS_MULTIPROC_DIR and the main process serves the merged figures)."""

from prometheus_client import Counter, Histogram

RECORDS = Counter("cairn_records_processed_total", "Records read, cleaned and stored", ["pipeline"])
RECORDS_REDONE = Counter("cairn_records_redone_total", "Records of a re-run batch that were already stored", ["pipeline"])
BATCHES = Counter("cairn_batches_total", "Batches stored and checkpointed", ["pipeline"])
SHARD_OUTCOMES = Counter("cairn_shard_runs_total", "Shard runs by outcome", ["pipeline", "outcome"])
FAILURES = Counter("cairn_failures_total", "Shard failures by error type", ["pipeline", "error_type", "retryable"])
BATCH_SECONDS = Histogram(
    "cairn_batch_duration_seconds", "Read, clean, store and checkpoint of one batch", ["pipeline"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
