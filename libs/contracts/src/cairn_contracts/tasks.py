"""Celery task names: the scheduler sends them, the ingest worker registers them.

A task's name is its payload's message type, so the two can never disagree.
"""

from cairn_contracts.messages import RunFrontier, RunShard, RunShards

TASK_RUN_SHARD = RunShard.message_type
TASK_RUN_FRONTIER = RunFrontier.message_type
TASK_RUN_SHARDS = RunShards.message_type


def shard_keys_of(task: RunShard | RunShards | RunFrontier) -> list[str]:
    """The shards a task names: a RunShard's one, a bundle's (RunShards) all, a frontier runner's
    none (it pulls its job's items)."""
    if isinstance(task, RunShards):
        return list(task.shard_keys)
    if isinstance(task, RunShard):
        return [task.shard_key]
    return []
