"""Fair dispatch across tenants: per-tenant in-flight caps and round-robin.

RabbitMQ serves one ingest queue first come first served (within a priority), so a tenant that
sends the tasks of a 1,000-shard job at once puts every other tenant's shard behind them. The
scheduler therefore keeps a job's shards PLANNED in MongoDB and sends only as many tasks as each
tenant may have in flight (QUEUED or RUNNING): `max_in_flight_shards` of the tenant's quotas
(`tenants` collection), else `CAIRN_TENANT_MAX_IN_FLIGHT_SHARDS`. Free room is handed out
round-robin, one task per tenant per round, the tenant with the fewest tasks in flight first,
within a tenant by job priority, then age, then shard index.

The cap counts shard *tasks*, as a worker sees them: a bundle of small shards (bundles.py, about
one batch of records in all) is one task, in flight while any of its shards is. What a cap bounds
is how long another tenant's task can wait behind this tenant's in the queue, and a bundle takes a
worker no longer than a large shard's task does; counted shard by shard, a cap of 64 let a job of
64-record shards keep only four bundles queued, and its workers waited for the refills (issue 14:
1,024 such shards took 1.6-2.3x the time of 8 large ones with the cap, 1.45x without). Each shard
sent records its task's first shard key (`QUEUED_TASK`, cairn_contracts.store: written by the pass
and again by a worker's bulk claim of a bundle or frontier block); one sent or claimed alone (a
retry, a reclaim, a lost task, a replay) has none and counts alone. A pass runs when a job is planned,
when a shard finishes while shards are left waiting, and every `CAIRN_FAIR_DISPATCH_INTERVAL_S`.

Priorities across tenants: the ingest queue delivers a higher priority before every lower one, so
a tenant whose job asks for a higher priority than another's would keep the other's queued task
behind the tasks it refills its cap with, for as long as its job lasts. A pass therefore never
publishes a task above the lowest priority another tenant's queued tasks wait at (`_ceilings`;
each task sent here records its `queued_priority`): across tenants a task waits for at most the
tasks queued before it, while inside a tenant (and with no other tenant's task queued) a higher
priority still overtakes what is queued.

`fair_pick` is the pure decision; `FairDispatch` reads the state, asks it, and sends what it
picked in bulk, as every dispatch (jobs.py): the tasks of each priority published together with
their confirms awaited together (`dispatch_all`), then one `update_many` per priority marks the sent shards
PLANNED -> QUEUED (publish first: a crash in between re-sends, and the worker's lease claim makes
the second task a no-op). Passes of one scheduler never overlap: a pass asked for while one runs
is folded into one more round of the running pass, and shard events start at most one pass per
`refill_interval_s` (CAIRN_FAIR_REFILL_INTERVAL_S): a pass reads the in-flight shards of every
running job, so a pass per event made a 1,000-shard job cost O(shards^2) reads, while the room an
event frees is not urgent (a capped tenant still has a full queue of tasks waiting in RabbitMQ).

What is not capped: retries (their shard was in flight), reclaimed and lost tasks re-sent by the
reaper, and lease-frontier runners (a fixed, small number per job). Since a slot holds a bundle,
each wave of failures of a tenant's small shards (a target outage) puts about cap x
max_bundle_shards retries outside the cap, sent alone when they come due (each a task of one
small shard, at most at the priority ceiling), and waves can overlap; sending due retries through
this pass, in bundles, would bound them too. Two schedulers running a pass
at once may each fill the same room, overshooting a cap by that much for a moment.
"""

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pymongo import UpdateMany
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.messages import MAX_BUNDLE_SHARDS, RunShard, RunShards
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import DEFAULT_TENANT, JOBS, QUEUED_TASK, SHARDS
from cairn_contracts.tasks import shard_keys_of
from cairn_contracts.tenancy import TENANTS, TenantRecord
from cairn_runtime.celery_config import ShardDispatcher, dispatch_all
from cairn_runtime.log import log_context
from cairn_scheduler.bundles import PlannedShard, fits_one_batch, shard_tasks

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Strategies whose shards are dispatched one task each (lease-frontier items are pulled by runners).
_TASK_PER_SHARD = ["range", "hash_mod"]


def fair_pick(
    waiting: Mapping[str, Sequence[T]],
    in_flight: Mapping[str, int],
    cap: Callable[[str], int | None],
    budget: int | None = None,
) -> list[tuple[str, T]]:
    """The (tenant, item) pairs to dispatch now, in dispatch order.

    `waiting`: each tenant's items in its own order of preference; `in_flight`: what each tenant
    has queued or running; `cap(tenant)`: its most in flight (None: no cap); `budget`: the most
    items to pick in all (None: no limit). Round-robin: each round gives one item to every tenant
    that has one waiting and room under its cap, tenants with fewer in flight first (then by
    name, for a stable order), until no tenant can take one or the budget is spent."""
    flying = {tenant: in_flight.get(tenant, 0) for tenant in waiting}
    queues = {tenant: list(items) for tenant, items in waiting.items() if items}
    taken = {tenant: 0 for tenant in queues}
    picked: list[tuple[str, T]] = []
    while budget is None or len(picked) < budget:
        order = sorted(
            (t for t in queues if taken[t] < len(queues[t]) and _has_room(cap(t), flying[t])),
            key=lambda t: (flying[t], t),
        )
        if not order:
            break
        for tenant in order:
            if budget is not None and len(picked) >= budget:
                break
            picked.append((tenant, queues[tenant][taken[tenant]]))
            taken[tenant] += 1
            flying[tenant] += 1
    return picked


def _has_room(cap: int | None, flying: int) -> bool:
    return cap is None or flying < cap


@dataclass(frozen=True)
class WaitingTask:
    """The task that would send some PLANNED shards of one job (`message`: a bundle, or one
    shard): what the caps count and `fair_pick` hands out."""

    message: RunShard | RunShards
    shards: int
    priority: int

    @property
    def job_id(self) -> str:
        return self.message.job_id

    @property
    def shard_keys(self) -> list[str]:
        return shard_keys_of(self.message)


@dataclass
class FairDispatch:
    """Sends PLANNED shard tasks within each tenant's in-flight cap, round-robin across tenants.

    `default_cap`: a tenant's cap unless its `tenants` document sets `quotas.max_in_flight_shards`
    (None: uncapped); `budget`: the most shard tasks in flight across all tenants (None: no
    limit; set it near the workers' total concurrency so that round-robin, not the queue, orders
    the tenants)."""

    db: AsyncDatabase
    dispatcher: ShardDispatcher
    default_cap: int | None
    budget: int | None = None
    # Shortest time (s) between passes started by shard events; 0: one pass per event.
    refill_interval_s: float = 0.1
    max_bundle_shards: int = MAX_BUNDLE_SHARDS  # small shards per task (bundles.py); 1: a task per shard
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _last_pass: float = field(default=float("-inf"), repr=False)  # loop time the last pass started
    _refill: "asyncio.Task[int] | None" = field(default=None, repr=False)  # the pass an event put off
    _again: bool = field(default=False, repr=False)
    # Whether the last pass may have left PLANNED shards behind (a tenant at its cap, or the
    # budget spent): only then is a shard event worth a pass (see `after_shard_finished`).
    backlog: bool = field(default=True, repr=False)

    async def after_shard_finished(self) -> int:
        """A pass if the last one left shards waiting, else nothing (returns what was sent now).

        A pass reads every running job and counts each tenant's shards in flight; once every
        PLANNED shard is out, a job's remaining shard events would each pay for that and send
        nothing. Within `refill_interval_s` of the last pass the pass is put off to the end of
        that interval (one pass for every event in it; 0 is returned). Shards planned by another
        scheduler meanwhile are sent by its own pass after planning, or by the periodic pass of
        either (`run_pass`, which always runs)."""
        if not self.backlog:
            return 0
        wait = self._last_pass + self.refill_interval_s - asyncio.get_running_loop().time()
        if wait <= 0:
            return await self.run_pass()
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._run_pass_in(wait), name="fair-dispatch-refill")
        return 0

    async def close(self) -> None:
        """Cancel a refill pass put off to later (at shutdown): what it would have sent is sent by
        the periodic pass of this or another scheduler."""
        refill, self._refill = self._refill, None
        if refill is not None and not refill.done():
            refill.cancel()
            await asyncio.wait([refill])  # never raises: a cancel of this caller still reaches it

    async def _run_pass_in(self, delay_s: float) -> int:
        await asyncio.sleep(delay_s)
        try:
            return await self.run_pass()
        except Exception:  # the periodic pass is the fallback; an event's refill must not crash the loop
            logger.exception("fair dispatch: a refill pass failed; the periodic pass retries")
            return 0

    async def run_pass(self) -> int:
        """Dispatch what fits now; returns how many shards this call sent (in however many
        tasks). If a pass is running already, it runs one more round for this call instead (0 is returned here), so a
        shard event never waits behind a queue of passes."""
        if self._lock.locked():
            self._again = True
            return 0
        sent = 0
        async with self._lock:
            self._again = True
            while self._again:
                self._again = False
                self._last_pass = asyncio.get_running_loop().time()
                sent += await self._run_pass()
        return sent

    async def _run_pass(self) -> int:
        jobs = [
            job
            async for job in self.db[JOBS].find(
                {"state": {"$in": [JobState.STARTED, JobState.RETRY]}, "cancel_requested": {"$in": [False, None]}},
                {"tenant": 1, "priority": 1, "created_at_ms": 1, "created_at": 1, BATCH_SIZE: 1},
            )
        ]
        if not jobs:
            self.backlog = False
            return 0
        by_tenant: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for job in jobs:
            by_tenant[job.get("tenant") or DEFAULT_TENANT].append(job)
        caps = {tenant: await self._cap(tenant) for tenant in by_tenant}
        in_flight, lowest = await self._in_flight(jobs)
        waiting: dict[str, list[WaitingTask]] = {}
        rooms: dict[str, int | None] = {}
        for tenant, tenant_jobs in by_tenant.items():
            cap = caps[tenant]
            room = None if cap is None else max(0, cap - in_flight[tenant])
            if self.budget is not None:
                room = self.budget if room is None else min(room, self.budget)
            rooms[tenant] = room
            waiting[tenant] = await self._waiting(tenant_jobs, room)
        budget = None if self.budget is None else max(0, self.budget - sum(in_flight.values()))
        ceilings = _ceilings(lowest)
        picked = [_capped(task, ceilings[tenant]) for tenant, task in fair_pick(waiting, in_flight, caps.__getitem__, budget)]
        # More may wait where the look-up stopped at the tenant's room, or where the budget cut.
        self.backlog = len(picked) < sum(len(found) for found in waiting.values()) or any(
            (room := rooms[tenant]) is not None and len(waiting[tenant]) >= room for tenant in waiting
        )
        try:
            await self._send(picked)
        except BaseException:
            self.backlog = True  # what it picked is still PLANNED: the next event's pass sends it
            raise
        if picked:
            logger.debug("fair dispatch: %d shard task(s) sent (%s)", len(picked), _per_tenant(picked, by_tenant))
        return sum(task.shards for task in picked)

    async def _in_flight(self, jobs: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int | None]]:
        """Per tenant of `jobs`: (their tasks in flight: distinct `queued_task`s of their shards
        QUEUED or RUNNING, a shard without one counting alone; the lowest priority their QUEUED
        tasks wait at: the one a pass published them at, else their job's; None: none is queued).

        One read per in-flight state, by equality on `state` (a prefix of the (state, ...)
        indexes), for every tenant at once, the shards of other jobs skipped here: what is in
        flight is bounded by the caps, and an equality is served by an index on MongoDB and on
        the stand-in alike, where a `job_id` `$in` per tenant made the stand-in read every shard
        of the store in Python on every pass."""
        tenant_of = {job["_id"]: job.get("tenant") or DEFAULT_TENANT for job in jobs}
        priority_of = {job["_id"]: int(job.get("priority") or 2) for job in jobs}
        tasks: dict[str, set[tuple[str, str, str]]] = {tenant: set() for tenant in tenant_of.values()}
        lowest: dict[str, int | None] = dict.fromkeys(tenant_of.values())
        for state in (ShardState.QUEUED, ShardState.RUNNING):
            async for shard in self.db[SHARDS].find({"state": state}, {"job_id": 1, "queued_priority": 1, QUEUED_TASK: 1}):
                tenant = tenant_of.get(shard.get("job_id"))
                if tenant is None:
                    continue
                # A task's key and a shard sent alone are told apart, also where the shard sent
                # alone is the first of the bundle it came from (its key is the bundle's).
                task = ("task", shard[QUEUED_TASK]) if shard.get(QUEUED_TASK) else ("alone", shard["_id"])
                tasks[tenant].add((shard["job_id"], *task))
                if state == ShardState.QUEUED:
                    priority = int(shard.get("queued_priority") or priority_of[shard["job_id"]])
                    now_lowest = lowest[tenant]
                    lowest[tenant] = priority if now_lowest is None else min(now_lowest, priority)
        return {tenant: len(found) for tenant, found in tasks.items()}, lowest

    async def _cap(self, tenant: str) -> int | None:
        record = TenantRecord.of(await self.db[TENANTS].find_one({"_id": tenant}, {"quotas": 1}))
        own = record.quotas.max_in_flight_shards
        return own if own is not None else self.default_cap

    async def _waiting(self, jobs: list[dict[str, Any]], room: int | None) -> list[WaitingTask]:
        """Up to `room` tasks of PLANNED shards of these jobs (one tenant's): higher priority
        first, then older jobs, then shard index; each job's shards grouped into tasks as they
        would be sent (`shard_tasks`: small ones in bundles). A job's shards are read `room` at a
        time, and on only while they are small (one batch or less: bundled), up to what `room`
        tasks could carry (`max_bundle_shards` shards each): a job of large shards costs a pass
        no more reads than before bundles counted once."""
        ordered = sorted(jobs, key=lambda job: (-int(job.get("priority") or 0), int(job.get("created_at_ms") or 0), job["_id"]))
        found: list[WaitingTask] = []
        for job in ordered:
            if room is not None and len(found) >= room:
                break
            want = None if room is None else room - len(found)
            batch_size = _batch_size(job)
            shards = await self._planned(job["_id"], want)
            small = any(fits_one_batch(shard.records_estimate, batch_size) for shard in shards)
            if want is not None and len(shards) == want and self.max_bundle_shards > 1 and small:
                shards += await self._planned(job["_id"], want * (self.max_bundle_shards - 1), after=shards[-1].index)
            for task in shard_tasks(job["_id"], shards, batch_size, self.max_bundle_shards):
                found.append(WaitingTask(task, len(shard_keys_of(task)), int(job.get("priority") or 2)))
        return found if room is None else found[:room]

    async def _planned(self, job_id: str, limit: int | None, after: int | None = None) -> list[PlannedShard]:
        """The job's PLANNED shards of task-per-shard strategies in index order (past index
        `after`), at most `limit` of them (None: all)."""
        query: dict[str, Any] = {"job_id": job_id, "state": ShardState.PLANNED, "strategy": {"$in": _TASK_PER_SHARD}}
        if after is not None:
            query["index"] = {"$gt": after}
        cursor = self.db[SHARDS].find(query, {"shard_key": 1, "index": 1, "records_estimate": 1}).sort("index", 1)
        if limit is not None:
            cursor = cursor.limit(limit)
        return [
            PlannedShard(shard["shard_key"], int(shard.get("records_estimate") or 0), int(shard.get("index") or 0)) async for shard in cursor
        ]

    async def _send(self, picked: list[WaitingTask]) -> None:
        """The bulk dispatch of the picked tasks: per priority, every task published with its
        confirm awaited together, then one bulk write per priority marks their shards QUEUED with
        that `queued_priority` and their task's `queued_task` (still PLANNED only: one a worker
        claimed meanwhile is RUNNING and stays so)."""
        if not picked:
            return
        by_priority: dict[int, list[WaitingTask]] = defaultdict(list)
        for task in picked:
            by_priority[task.priority].append(task)
        for priority in sorted(by_priority, reverse=True):  # the most urgent first
            await dispatch_all(self.dispatcher, [task.message for task in by_priority[priority]], priority)
        for priority, tasks in by_priority.items():  # the priority each waits at (`_ceilings`)
            queued = {"state": ShardState.QUEUED, "queued_at": clock.utcnow(), "queued_at_ms": clock.now_ms(), "queued_priority": priority}
            await self.db[SHARDS].bulk_write(
                [
                    UpdateMany({"_id": {"$in": task.shard_keys}, "state": ShardState.PLANNED}, {"$set": {**queued, QUEUED_TASK: task.shard_keys[0]}})
                    for task in tasks
                ],
                ordered=False,
            )
        sent: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for task in picked:
            sent[task.job_id][0] += task.shards
            sent[task.job_id][1] += 1
        for job_id, (shards, tasks_sent) in sent.items():
            with log_context(job_id=job_id):  # `grep <job id>` follows its dispatch too
                logger.info("job %s: %d shard(s) dispatched in %d task(s)", job_id, shards, tasks_sent)


BATCH_SIZE = "spec.batch_size"


def _batch_size(job: dict[str, Any]) -> int:
    """The job's records per batch from a projection on `spec.batch_size` (nested on MongoDB, a
    flat "spec.batch_size" key on the stand-in: docs/mongodb-stand-in.md); 0 if absent."""
    spec = job.get("spec")
    value = job.get(BATCH_SIZE, spec.get("batch_size") if isinstance(spec, dict) else None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _ceilings(lowest: Mapping[str, int | None]) -> dict[str, int | None]:
    """Each tenant's highest publish priority: the lowest one any other tenant's queued tasks
    wait at (None: no other tenant has a task queued). Module docstring: priorities across tenants."""
    return {tenant: min((p for other, p in lowest.items() if other != tenant and p is not None), default=None) for tenant in lowest}


def _capped(task: WaitingTask, ceiling: int | None) -> WaitingTask:
    return task if ceiling is None or task.priority <= ceiling else replace(task, priority=ceiling)


def _per_tenant(picked: list[WaitingTask], by_tenant: Mapping[str, list[dict[str, Any]]]) -> str:
    tenant_of = {job["_id"]: tenant for tenant, jobs in by_tenant.items() for job in jobs}
    counts: dict[str, int] = defaultdict(int)
    for task in picked:
        counts[tenant_of.get(task.job_id, "?")] += 1
    return ", ".join(f"{tenant}: {n}" for tenant, n in sorted(counts.items()))
