"""Celery task names: the scheduler sends them, the ingest worker registers them.

A task's name is its payload's message type, so the two can never disagree.
"""

from cairn_contracts.messages import RunFrontier, RunShard

TASK_RUN_SHARD = RunShard.message_type
TASK_RUN_FRONTIER = RunFrontier.message_type
