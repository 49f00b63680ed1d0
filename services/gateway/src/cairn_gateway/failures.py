"""What a job's status says about its failures: shards waiting for a retry, shards dead-lettered."""

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS
from cairn_gateway.schemas import FailedShardInfo, ShardRetryInfo

DETAIL_LIMIT = 50
_FIELDS = {"shard_key": 1, "attempts": 1, "retry": 1, "next_retry_at_ms": 1, "last_error": 1, "dead_letter_id": 1}


async def retrying_shards(db: AsyncDatabase, job_id: str, limit: int = DETAIL_LIMIT) -> list[ShardRetryInfo]:
    found = db[SHARDS].find({"job_id": job_id, "state": ShardState.RETRY}, _FIELDS).sort("shard_key", 1).limit(limit)
    return [_retry_info(shard) async for shard in found]


async def failed_shards(db: AsyncDatabase, job_id: str, limit: int = DETAIL_LIMIT) -> list[FailedShardInfo]:
    found = db[SHARDS].find({"job_id": job_id, "state": ShardState.FAILED}, _FIELDS).sort("shard_key", 1).limit(limit)
    return [
        FailedShardInfo(
            shard_key=shard["shard_key"],
            task_error_id=shard.get("dead_letter_id"),
            attempts=int(shard.get("attempts", 0)),
            error=shard.get("last_error"),
            entry_url=f"/dlq/entries/{shard['dead_letter_id']}" if shard.get("dead_letter_id") else None,
        )
        async for shard in found
    ]


def _retry_info(shard: dict[str, Any]) -> ShardRetryInfo:
    retry: dict[str, Any] = shard["retry"] if isinstance(shard.get("retry"), dict) else {}
    due_ms = retry.get("retry_at_ms") or shard.get("next_retry_at_ms")
    return ShardRetryInfo(
        shard_key=shard["shard_key"],
        attempt=int(retry.get("attempt") or shard.get("attempts", 0)),
        max_attempts=retry.get("max_attempts"),
        next_retry_at=clock.from_ms(due_ms) if due_ms else None,
        delay_s=retry.get("delay_s"),
        last_error=shard.get("last_error"),
    )
