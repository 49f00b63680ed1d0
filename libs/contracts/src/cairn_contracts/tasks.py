"""Celery task names: the scheduler sends them, the ingest worker registers them."""

TASK_RUN_SHARD = "cairn.ingest.run_shard"
TASK_RUN_FRONTIER = "cairn.ingest.run_frontier"
