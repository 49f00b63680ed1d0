"""Shards whose work has no task: the scheduler sends one.

- **Expired leases** (`reap`): a holder that stopped renewing its lease; the shard goes back to
  ready and is dispatched again.
- **Due retries** (`dispatch_due_retries`): a shard that failed retryably waits in `RETRY` with
  `next_retry_at_ms`; no worker holds a delivery for it meanwhile (a held delivery would pass
  RabbitMQ's `consumer_timeout`). Once due it goes back to `QUEUED` and its task is sent.
- **Lost tasks** (`redispatch_lost`): a shard `QUEUED` whose task message is provably gone (the
  ingest queue was seen empty on consecutive passes while the shard stayed `QUEUED`: see
  `LostTaskWatch`). A slow backlog is not a lost task, so nothing is re-sent while tasks wait.

Safe with several schedulers: every return to ready is one conditional update on the shard's
state and the value that made it eligible (fencing token and expired lease; retry due time;
queued time), so exactly one scheduler wins it and dispatches. The dispatch comes after the write;
if this scheduler dies in between, the shard is `QUEUED` without a task, which is exactly what
`redispatch_lost` finds (a duplicate task is harmless: the claim makes it a no-op).
"""

import logging
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.states import ShardState
from cairn_contracts.store import NOT_CANCELLED, QUEUED_TASK, SHARDS
from cairn_runtime.celery_config import ShardDispatcher, task_for_shard
from cairn_runtime.tracing import continued_trace
from cairn_scheduler.metrics import LEASE_RECLAIMS, SHARD_REDISPATCHES

logger = logging.getLogger(__name__)

RETRY_BATCH = 500  # due retries sent per pass; a fuller pass is followed by another at once
_SHARD_FIELDS = {"job_id": 1, "shard_key": 1, "strategy": 1, "priority": 1, "index": 1}


@dataclass(frozen=True)
class DueRetries:
    sent: int  # tasks sent by this pass
    due_left: bool  # the pass stopped at RETRY_BATCH: more are due now
    next_due_ms: int | None  # epoch ms of the earliest retry not yet due (None: none waits)


@dataclass
class LostTaskWatch:
    """When is a `QUEUED` shard's task provably lost? Decided from the ingest queue's count of
    ready messages (a passive declare), observed once per maintenance pass.

    A shard is `QUEUED` only after its task was confirmed by the broker (or, on a return to ready,
    just before it is sent). If the queue held no ready message at two consecutive observations,
    and the shard was `QUEUED` before the first and still is after the second, its message was not
    waiting in the queue at either time and no worker claimed it in between (a claim makes it
    `RUNNING`): it was consumed without a claim, never sent, or sits with a stalled consumer.
    Any ready message (a backlog), or a failed observation, starts the watch over; so does a
    re-send, so that a task lost again is found again.

    `since_ms`: time of the first of the consecutive empty observations; `passes`: how many.
    """

    passes_needed: int = 2
    since_ms: int | None = None
    passes: int = 0

    def observe(self, ready: int | None, now_ms: int) -> None:
        """Record one observation: the queue's ready messages, or None if it could not be read."""
        if ready is None or ready > 0:
            self.restart()
            return
        if self.since_ms is None:
            self.since_ms = now_ms
        self.passes += 1

    def restart(self) -> None:
        self.since_ms = None
        self.passes = 0

    def cutoff_ms(self, now_ms: int, min_age_s: float) -> int | None:
        """Shards `QUEUED` (by `queued_at_ms`) before this epoch-ms time have lost their task; None
        while nothing is provably lost. `min_age_s` is a floor on how long a shard waited."""
        if self.since_ms is None or self.passes < self.passes_needed:
            return None
        return min(self.since_ms, now_ms - int(min_age_s * 1000))


@dataclass(frozen=True)
class LeaseReaper:
    db: AsyncDatabase
    dispatcher: ShardDispatcher

    async def reap(self) -> int:
        now_ms = clock.now_ms()
        reclaimed = 0
        expired = {"state": ShardState.RUNNING, "lease_until": {"$lt": now_ms}}
        fields = {"job_id": 1, "shard_key": 1, "fencing_token": 1, "strategy": 1, "priority": 1, "index": 1, "taken_by": 1}
        async for shard in self.db[SHARDS].find(expired, fields):
            won = await self.db[SHARDS].find_one_and_update(
                {"_id": shard["_id"], "fencing_token": shard["fencing_token"], **expired},
                {
                    "$set": {"state": ShardState.QUEUED, "taken_by": None, "reclaimed_at": clock.utcnow(), "queued_at_ms": now_ms, QUEUED_TASK: None},
                    "$inc": {"reclaims": 1},
                },
            )
            if won is None:
                continue  # another scheduler, or a worker's claim, took it first
            reclaimed += 1
            LEASE_RECLAIMS.inc()
            logger.warning(
                "shard %s: lease of %s expired; back to ready (attempts so far counted at claim)",
                shard["shard_key"], shard.get("taken_by"),
            )
            await self.dispatcher.dispatch(task_for_shard(shard), int(shard.get("priority", 2)))
        return reclaimed

    async def dispatch_due_retries(self, now_ms: int | None = None, limit: int = RETRY_BATCH) -> DueRetries:
        """Send the task of every shard whose retry is due (`RETRY`, `next_retry_at_ms` <= now).

        Each is moved back to `QUEUED` by one conditional update on its state and due time, and
        only the scheduler that made that update sends the task. A lease-frontier item gets a
        runner of its job (`task_for_shard`), one per job and pass: a runner pulls every
        claimable item. If the send fails the shard is put back to `RETRY` (conditionally) and
        the error raised, so the next pass tries again.
        """
        now_ms = now_ms if now_ms is not None else clock.now_ms()
        sent, seen = 0, 0
        runners: set[str] = set()
        fields = {**_SHARD_FIELDS, "next_retry_at_ms": 1, "retry": 1, "retry_trace_context": 1}
        waiting = self.db[SHARDS].find({"state": ShardState.RETRY}, fields)
        async for shard in waiting.sort("next_retry_at_ms", 1).limit(limit):
            due_ms = shard.get("next_retry_at_ms")
            if isinstance(due_ms, (int, float)) and due_ms > now_ms:
                return DueRetries(sent, False, int(due_ms))
            seen += 1
            if await self._send_retry(shard, due_ms, now_ms, runners):
                sent += 1
        return DueRetries(sent, seen >= limit, None)

    async def _send_retry(self, shard: dict[str, Any], due_ms: Any, now_ms: int, runners: set[str]) -> bool:
        won = await self.db[SHARDS].find_one_and_update(
            {
                "_id": shard["_id"],
                "state": ShardState.RETRY,
                "next_retry_at_ms": due_ms,
                **NOT_CANCELLED,  # a cancelled job's shard never starts
            },
            {"$set": {"state": ShardState.QUEUED, "queued_at": clock.utcnow(), "queued_at_ms": now_ms, QUEUED_TASK: None}, "$inc": {"retry_dispatches": 1}},
        )
        if won is None:
            return False  # another scheduler, a frontier runner's claim or a cancel came first
        task = task_for_shard(shard)
        attempt = (shard.get("retry") or {}).get("attempt") if isinstance(shard.get("retry"), dict) else None
        if shard.get("strategy") == "lease_frontier" and shard["job_id"] in runners:
            logger.info("shard %s: retry due (after attempt %s); the runner sent this pass takes it", shard["shard_key"], attempt)
            return False
        try:
            with continued_trace(shard.get("retry_trace_context")):  # the retry is a child of its failed attempt
                await self.dispatcher.dispatch(task, int(shard.get("priority", 2)))
        except Exception:
            await self.db[SHARDS].update_one(
                {"_id": shard["_id"], "state": ShardState.QUEUED, "queued_at_ms": now_ms},
                {"$set": {"state": ShardState.RETRY}, "$inc": {"retry_dispatches": -1}},
            )
            raise
        if shard.get("strategy") == "lease_frontier":
            runners.add(shard["job_id"])
        SHARD_REDISPATCHES.labels("retry_due").inc()
        logger.info("shard %s: retry due (after attempt %s); task sent", shard["shard_key"], attempt)
        return True

    async def redispatch_lost(self, cutoff_ms: int) -> int:
        """Send the task again for every shard `QUEUED` before `cutoff_ms` (epoch ms), whose task
        the caller has established is lost (`LostTaskWatch.cutoff_ms`). Lease-frontier items get
        one runner per job. Returns how many tasks were sent."""
        lost = {"state": ShardState.QUEUED, "queued_at_ms": {"$lt": cutoff_ms}}
        sent = 0
        runners: set[str] = set()
        async for shard in self.db[SHARDS].find(lost, {**_SHARD_FIELDS, "queued_at_ms": 1}):
            won = await self.db[SHARDS].find_one_and_update(
                {"_id": shard["_id"], "state": ShardState.QUEUED, "queued_at_ms": shard["queued_at_ms"]},
                {"$set": {"queued_at_ms": clock.now_ms(), QUEUED_TASK: None}, "$inc": {"redispatches": 1}},
            )
            if won is None:
                continue  # claimed meanwhile, or another scheduler re-sent it
            if shard.get("strategy") == "lease_frontier":
                if shard["job_id"] in runners:
                    continue
                runners.add(shard["job_id"])
            logger.warning(
                "shard %s: queued since %d ms epoch and its task is lost (the ingest queue was empty); task sent again",
                shard["shard_key"], shard["queued_at_ms"],
            )
            await self.dispatcher.dispatch(task_for_shard(shard), int(shard.get("priority", 2)))
            SHARD_REDISPATCHES.labels("lost_task").inc()
            sent += 1
        return sent
