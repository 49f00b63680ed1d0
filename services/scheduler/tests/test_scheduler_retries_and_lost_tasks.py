"""Issue 11, items 2(a) and 5 on the scheduler's side.

- Due retries: a shard waiting in RETRY is moved back to QUEUED by one conditional update and its
  task sent once it is due, by exactly one scheduler (real MongoDB-wire server).
- Lost tasks: the decision (`LostTaskWatch`) as plain logic, then against the real broker: a deep
  backlog of waiting tasks is not a lost task; a task whose message really vanished (the queue
  purged) is re-sent once and counted.
"""

import asyncio
import functools
from typing import Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from cairn_contracts import clock
from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.states import ShardState
from cairn_contracts.store import SHARDS
from cairn_contracts.topology import QUEUE_INGEST
from cairn_runtime.celery_config import ShardTaskSender, celery_config
from cairn_scheduler.gauges import QueueCounts
from cairn_scheduler.jobs import JobScheduler
from cairn_scheduler.maintenance import Maintenance, retry_sleep_s
from cairn_scheduler.reaper import LeaseReaper, LostTaskWatch
from cairn_testkit.records import seed_shard


class Recorder:
    def __init__(self) -> None:
        self.dispatched: list[tuple[RunShard | RunFrontier, int]] = []

    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        await asyncio.sleep(0)  # let a concurrent scheduler interleave
        self.dispatched.append((task, priority))


class BrokerDown:
    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        raise ConnectionError("broker unreachable")




def redispatches(reason: str) -> float:
    return REGISTRY.get_sample_value("cairn_shard_redispatches_total", {"reason": reason}) or 0.0


# --- due retries ------------------------------------------------------------------------------------


async def test_a_due_retry_goes_back_to_queued_and_its_task_is_sent_and_one_not_due_waits(db) -> None:
    now = clock.now_ms()
    await seed_shard(db, "job:0000", ShardState.RETRY, next_retry_at_ms=now - 10, retry={"attempt": 1}, queued_task="job:bundle")
    await seed_shard(db, "job:0001", ShardState.RETRY, next_retry_at_ms=now + 3_600_000)
    await seed_shard(db, "job:0002", ShardState.RETRY, next_retry_at_ms=now - 10, cancel_requested=True)
    recorder = Recorder()
    before = redispatches("retry_due")

    due = await LeaseReaper(db, recorder).dispatch_due_retries(now_ms=now)

    assert (due.sent, due.due_left, due.next_due_ms) == (1, False, now + 3_600_000)
    assert recorder.dispatched == [(RunShard(job_id="job", shard_key="job:0000"), 3)]
    sent = await db[SHARDS].find_one({"_id": "job:0000"})
    assert (sent["state"], sent["queued_at_ms"], sent["retry_dispatches"]) == (ShardState.QUEUED, now, 1)
    assert sent["queued_task"] is None  # sent alone, not in the bundle it came in: a task of its own for fair dispatch
    assert (await db[SHARDS].find_one({"_id": "job:0001"}))["state"] == ShardState.RETRY
    assert (await db[SHARDS].find_one({"_id": "job:0002"}))["state"] == ShardState.RETRY  # cancelled: never sent
    assert redispatches("retry_due") == before + 1
    again = await LeaseReaper(db, recorder).dispatch_due_retries(now_ms=now)
    assert again.sent == 0 and len(recorder.dispatched) == 1


async def test_due_retries_of_a_lease_frontier_job_get_one_runner_per_pass(db) -> None:
    now = clock.now_ms()
    for index in (2, 5, 7):
        await seed_shard(db, f"front:{index:04d}", ShardState.RETRY, strategy="lease_frontier", index=index, next_retry_at_ms=now - 1)
    recorder = Recorder()

    assert (await LeaseReaper(db, recorder).dispatch_due_retries(now_ms=now)).sent == 1

    assert recorder.dispatched == [(RunFrontier(job_id="front", lane=2), 3)]
    states = {s["_id"]: s["state"] async for s in db[SHARDS].find({"job_id": "front"})}
    assert set(states.values()) == {ShardState.QUEUED}, states  # the runner pulls every one of them


async def test_two_schedulers_dispatching_due_retries_at_once_send_each_task_once(db) -> None:
    now = clock.now_ms()
    keys = [f"job:{i:04d}" for i in range(30)]
    for key in keys:
        await seed_shard(db, key, ShardState.RETRY, next_retry_at_ms=now - 1)
    first, second = Recorder(), Recorder()

    results = await asyncio.gather(
        LeaseReaper(db, first).dispatch_due_retries(now_ms=now), LeaseReaper(db, second).dispatch_due_retries(now_ms=now)
    )

    sent = [task.shard_key for task, _ in first.dispatched + second.dispatched]
    assert sorted(sent) == keys
    assert sum(r.sent for r in results) == len(keys)
    assert {s["retry_dispatches"] async for s in db[SHARDS].find({"job_id": "job"})} == {1}


async def test_a_retry_whose_send_fails_waits_in_retry_for_the_next_pass(db) -> None:
    now = clock.now_ms()
    await seed_shard(db, "job:0000", ShardState.RETRY, next_retry_at_ms=now - 1)

    with pytest.raises(ConnectionError):
        await LeaseReaper(db, BrokerDown()).dispatch_due_retries(now_ms=now)

    back = await db[SHARDS].find_one({"_id": "job:0000"})
    assert (back["state"], back["retry_dispatches"]) == (ShardState.RETRY, 0)
    recorder = Recorder()
    assert (await LeaseReaper(db, recorder).dispatch_due_retries()).sent == 1


def test_the_retry_dispatcher_sleeps_until_the_next_due_retry_within_bounds() -> None:
    assert retry_sleep_s(None, 1_000, 1.0) == 1.0
    assert retry_sleep_s(1_250, 1_000, 1.0) == 0.25
    assert retry_sleep_s(3_600_000, 1_000, 1.0) == 1.0
    assert retry_sleep_s(900, 1_000, 1.0) == 0.01
    assert retry_sleep_s(None, 1_000, 1.0, due_left=True) == 0.0
    # run_every takes a returned float as the next wait: every answer is one, even for int bounds.
    assert all(isinstance(retry_sleep_s(due, 1_000, 2, left), float) for due, left in ((None, False), (1_250, False), (None, True)))


# --- lost tasks: the decision -------------------------------------------------------------------------


def test_a_backlog_never_proves_a_task_lost() -> None:
    watch = LostTaskWatch()
    for now_ms in range(0, 100_000, 5_000):
        watch.observe(1_274, now_ms)
        assert watch.cutoff_ms(now_ms, min_age_s=0) is None


def test_a_task_is_lost_only_after_consecutive_empty_observations_and_only_if_queued_before_the_first() -> None:
    watch = LostTaskWatch(passes_needed=2)
    watch.observe(0, 10_000)
    assert watch.cutoff_ms(10_000, min_age_s=0) is None  # one empty look proves nothing
    watch.observe(0, 15_000)
    assert watch.cutoff_ms(15_000, min_age_s=0) == 10_000  # queued before the first empty look
    assert watch.cutoff_ms(15_000, min_age_s=60) == 15_000 - 60_000  # and waited at least the floor
    watch.observe(0, 20_000)
    assert watch.cutoff_ms(20_000, min_age_s=0) == 10_000


def test_a_message_seen_or_a_failed_look_starts_the_watch_over() -> None:
    watch = LostTaskWatch(passes_needed=2)
    watch.observe(0, 10_000)
    watch.observe(3, 15_000)
    watch.observe(0, 20_000)
    assert watch.cutoff_ms(20_000, min_age_s=0) is None
    watch.observe(None, 25_000)  # the broker did not answer
    watch.observe(0, 30_000)
    assert watch.cutoff_ms(30_000, min_age_s=0) is None
    watch.observe(0, 35_000)
    assert watch.cutoff_ms(35_000, min_age_s=0) == 30_000
    watch.restart()
    assert watch.cutoff_ms(35_000, min_age_s=0) is None


# --- lost tasks: against the real broker ---------------------------------------------------------------


@pytest.fixture
def sender(test_env) -> Any:
    app = Celery("cairn-scheduler-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    yield ShardTaskSender(app)
    app.close()


def lost_task_maintenance(db: Any, broker: Any, sender: ShardTaskSender) -> Maintenance:
    return Maintenance(
        JobScheduler(db, sender),
        broker.publisher,
        LeaseReaper(db, sender),
        relay_after_s=10,
        redispatch_after_s=60,
        ingest_ready=functools.partial(QueueCounts(broker.connection).ready, QUEUE_INGEST),
    )


async def test_a_deep_backlog_is_not_redispatched_and_a_really_lost_task_is_sent_again_once(db, broker, sender) -> None:
    old = clock.now_ms() - 600_000  # queued ten minutes ago: well past the age floor
    keys = [f"job:{i:04d}" for i in range(40)]
    for key in keys:
        await seed_shard(db, key, ShardState.QUEUED, queued_at_ms=old)
        await sender.dispatch(RunShard(job_id="job", shard_key=key), 3)
    maintenance = lost_task_maintenance(db, broker, sender)
    before = redispatches("lost_task")

    # A backlog: every task waits in the queue, nobody consumes. Nothing is lost, nothing re-sent.
    for _ in range(4):
        assert await maintenance.redispatch_lost() == 0
    counts = QueueCounts(broker.connection)
    assert await counts.ready(QUEUE_INGEST) == len(keys)
    assert {s.get("redispatches", 0) async for s in db[SHARDS].find({"job_id": "job"})} == {0}

    # The messages really vanish (as a worker acking without claiming would lose them).
    await broker.queues[QUEUE_INGEST].purge()
    assert await maintenance.redispatch_lost() == 0  # one empty look proves nothing yet
    assert await maintenance.redispatch_lost() == len(keys)  # the second does: each sent again
    for _ in range(3):
        assert await maintenance.redispatch_lost() == 0  # ...once: they wait in the queue now

    assert await counts.ready(QUEUE_INGEST) == len(keys)
    assert {s["redispatches"] async for s in db[SHARDS].find({"job_id": "job"})} == {1}
    assert redispatches("lost_task") == before + len(keys)
