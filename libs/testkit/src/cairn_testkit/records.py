"""Stored documents as the services write them, for tests that seed a database: built from the
contracts' record models (`cairn_contracts.store`), never from copied dict layouts."""

from typing import Any

from cairn_contracts.messages import DeadLetter, OriginalMessage
from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS, ShardRecord
from cairn_contracts.tasks import TASK_RUN_SHARD
from cairn_contracts.topology import QUEUE_INGEST


async def seed_shard(
    db: Any,
    key: str,
    state: ShardState,
    *,
    strategy: str = "range",
    index: int = 0,
    fencing_token: int = 1,
    attempts: int = 1,
    **fields: Any,
) -> None:
    """Insert the shard `key` (`<job id>:<index>`, a range of 10 records, priority 3) into `db`'s
    shards collection (an AsyncDatabase); `fields` are set over the planned document."""
    record = ShardRecord(
        shard_key=key, job_id=key.split(":")[0], index=index, strategy=strategy, range_start=0, range_end=10,
        records_estimate=10, priority=3, state=state, fencing_token=fencing_token, attempts=attempts,
    )
    await db[SHARDS].insert_one({**record.to_document(), **fields})


def dead_letter(dead_letter_id: str = "dl-1", **changes: Any) -> DeadLetter:
    """A DeadLetter as the ingest worker sends one for a shard that failed for good (job-1:0002,
    `non_retryable` after 1 attempt, its task as the original message); `changes` replace fields."""
    fields: dict[str, Any] = {
        "dead_letter_id": dead_letter_id,
        "source_service": "ingest-worker",
        "source_queue": QUEUE_INGEST,
        "reason": "non_retryable",
        "error_type": "NonRetryableError",
        "error_message": "synthetic permanent failure at key 15",
        "stack": "Traceback ...",
        "job_id": "job-1",
        "shard_key": "job-1:0002",
        "attempts": 1,
        "original": OriginalMessage(body='{"job_id": "job-1"}', headers={"task": TASK_RUN_SHARD}),
    }
    return DeadLetter(**{**fields, **changes})
