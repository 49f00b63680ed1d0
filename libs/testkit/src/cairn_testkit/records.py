"""Stored documents as the services write them, for tests that seed a database: built from the
contracts' record models (`cairn_contracts.store`), never from copied dict layouts."""

from typing import Any

from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS, ShardRecord


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
