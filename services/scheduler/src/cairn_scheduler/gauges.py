"""The system's state as Prometheus gauges, refreshed every `CAIRN_GAUGES_INTERVAL_S`:

- queue depth and consumers of every Cairn queue, from the broker (a passive declare answers
  with the counts and creates nothing);
- jobs and shards by state, from MongoDB (one `$group` per collection);
- the age of the oldest shard waiting in QUEUED (the backlog's age, for alerting).

Only the scheduler runs it (one collector is enough, and it already holds both connections); a
pass that fails is logged and counted, and the gauges keep their last values until the next one.
"""

import logging
import time
from collections.abc import Iterable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import JOBS, SHARDS
from cairn_contracts.topology import QUEUES
from cairn_scheduler import metrics

logger = logging.getLogger(__name__)


class QueueCounts:
    """Ready messages and consumers of a queue, as the broker counts them: a passive declare
    answers with both and creates nothing. Ready messages exclude deliveries a consumer holds."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None

    async def counts(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of queue `name`; raises if the broker cannot answer."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        try:
            # robust=False: a robust queue is cached with stale counts (aio-pika RobustChannel's own keyword)
            queue = await self._channel.declare_queue(name, passive=True, robust=False)  # type: ignore[call-arg]
        except Exception:
            self._channel = None  # a failed passive declare (no such queue) closes the channel
            raise
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def ready(self, name: str) -> int:
        return (await self.counts(name))[0]


class GaugeCollector:
    def __init__(self, db: AsyncDatabase, connection: AbstractRobustConnection, queues: Iterable[str] | None = None) -> None:
        self._db = db
        self._counts = QueueCounts(connection)
        self._queues = tuple(queues) if queues is not None else tuple(q.name for q in QUEUES)

    async def collect_once(self) -> bool:
        """One pass over the broker and the store; False if any part failed."""
        ok = True
        for part in (self.collect_queues, self.collect_states, self.collect_backlog_age):
            try:
                await part()
            except Exception:
                ok = False
                logger.warning("gauge collection (%s) failed", part.__name__, exc_info=True)
        metrics.GAUGE_PASSES.labels("ok" if ok else "failed").inc()
        return ok

    async def collect_queues(self) -> None:
        for name in self._queues:
            messages, consumers = await self._counts.counts(name)
            metrics.QUEUE_MESSAGES.labels(name).set(messages)
            metrics.QUEUE_CONSUMERS.labels(name).set(consumers)

    async def collect_states(self) -> None:
        for collection, states, gauge in ((JOBS, JobState, metrics.JOBS), (SHARDS, ShardState, metrics.SHARDS)):
            counts = await count_by_state(self._db[collection])
            for state in states:
                gauge.labels(state.value).set(counts.pop(state.value, 0))
            for unknown, count in counts.items():  # a state this code does not know yet
                gauge.labels(str(unknown)).set(count)

    async def collect_backlog_age(self) -> None:
        oldest = await self._db[SHARDS].find_one(
            {"state": ShardState.QUEUED}, {"queued_at_ms": 1, "queued_at": 1}, sort=[("queued_at_ms", 1)]
        )
        metrics.OLDEST_QUEUED_SHARD_AGE.set(backlog_age_s(oldest, time.time()))


async def count_by_state(collection: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    async for row in await collection.aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}]):
        counts[str(row["_id"])] = int(row["n"])
    return counts


def backlog_age_s(shard: dict[str, Any] | None, now_s: float) -> float:
    """Seconds the given QUEUED shard has waited (0 for none, or one that says nothing usable):
    `queued_at_ms` when the shard has it, else `queued_at` in any stored form."""
    if not shard:
        return 0.0
    queued_ms = clock.stored_ms(shard.get("queued_at_ms"))
    if queued_ms is None:
        queued_ms = clock.stored_ms(shard.get("queued_at"))
    return max(0.0, now_s - queued_ms / 1000) if queued_ms is not None else 0.0
