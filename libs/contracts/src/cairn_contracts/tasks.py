"""Celery task names: the scheduler sends them, the ingest worker registers them."""

TASK_RUN_SHARD = "cairn.ingest.run_shard"
