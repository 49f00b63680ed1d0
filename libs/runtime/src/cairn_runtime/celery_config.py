"""The Celery configuration shared by the scheduler (which sends shard tasks) and the worker.

Both sides must declare the ingest queue with the same arguments as `declare_topology` does, or
RabbitMQ refuses the second declaration; so the kombu objects are built from the contracts.
"""

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Connection, Exchange, Queue
from kombu.connection import ConnectionPool, PooledConnection

from cairn_contracts.messages import RunFrontier, RunShard, RunShards
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD, TASK_RUN_SHARDS
from cairn_contracts.topology import EXCHANGE_TASKS, QUEUE_INGEST, queue_spec
from cairn_runtime.header_depth import bound_header_depth

INGEST_QUEUE = Queue(
    QUEUE_INGEST,
    Exchange(EXCHANGE_TASKS, type="direct", durable=True),
    routing_key=queue_spec(QUEUE_INGEST).bindings[0][1],
    durable=True,
    queue_arguments=dict(queue_spec(QUEUE_INGEST).arguments),
)

# A worker's Celery node name is this prefix and its CAIRN_WORKER_ID; a shard's `taken_by` is
# `<worker id>/<pool process pid>`, so the gateway finds the node and process running a shard.
WORKER_HOSTNAME_PREFIX = "cairn-ingest@"

# A task the scheduler and the DLQ handler send to the ingest workers.
ShardTask = RunShard | RunShards | RunFrontier


def worker_hostname(worker_id: str) -> str:
    """The Celery node name (remote control destination) of the worker `worker_id`."""
    return f"{WORKER_HOSTNAME_PREFIX}{worker_id}"


def celery_config(broker_url: str) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        # Publisher confirms for every message Celery publishes (tasks, retries).
        "broker_transport_options": {"confirm_publish": True},
        "broker_connection_retry_on_startup": True,
        # AMQP heartbeats: a broker connection that went silent (half-open) is noticed within ~2
        # beats instead of a task blocking on it; connects give up after 10 s and are retried.
        "broker_heartbeat": 30,
        "broker_connection_timeout": 10,
        "task_queues": (INGEST_QUEUE,),
        "task_default_queue": QUEUE_INGEST,
        "task_routes": {name: {"queue": QUEUE_INGEST} for name in (TASK_RUN_SHARD, TASK_RUN_SHARDS, TASK_RUN_FRONTIER)},
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,  # results live in MongoDB, not in Celery
        "task_ignore_result": True,
        # Ack only after the shard's work is durable; a killed worker's message is redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_delivery_mode": "persistent",
        "worker_hijack_root_logger": False,
        # Remote control (inspect, pool grow/shrink, shutdown, Cairn's terminate: the gateway's
        # /v1/workers routes) and worker events (heartbeats, online/offline: the gateway's worker
        # list, Flower) over the same broker: a pidbox fanout exchange with one auto-delete queue
        # per worker, and the `celeryev` topic exchange. Neither touches the ingest queue.
        # Task events (`task-received`/`-started`/`-succeeded`, Flower's task list) are off, as in
        # Celery: about three confirmed publishes per task, more broker and worker CPU than a small
        # shard's own store writes; a worker sends them with CAIRN_WORKER_TASK_EVENTS=true.
        "worker_send_task_events": False,
        # Not `task-sent` events: they would add a publish to every dispatch (the scheduler's hot
        # path); Flower sees a task from `task-received` on.
        "task_send_sent_event": False,
        "worker_enable_remote_control": True,
        # `pool_restart` (remote control) replaces the pool's processes; off, Celery refuses it.
        "worker_pool_restarts": True,
        # Events are advisory: none outlives a minute, so a monitor that went away leaves no backlog.
        "event_queue_ttl": 60.0,
        "event_queue_expires": 120.0,
        # Replies of remote control (auto-delete queues) are not kept past a short wait either.
        "control_queue_ttl": 30.0,
        "control_queue_expires": 60.0,
    }


# How often a remote-control call reconnects to a broker that went away before it gives up.
CONTROL_MAX_RETRIES = 2


class _BoundedEnsure:
    """kombu's pidbox (Celery's remote control) publishes with `retry=True` and no policy, and
    kombu then retries for as long as RabbitMQ is away: the calling thread stayed stuck for the
    whole outage, and the process could not exit while it was. This bounds every retried
    operation whose caller set no bound to CONTROL_MAX_RETRIES reconnects."""

    def ensure(
        self,
        obj: Any,
        fun: Any,
        errback: Any = None,
        max_retries: Any = None,
        interval_start: Any = 1,
        interval_step: Any = 1,
        interval_max: Any = 1,
        on_revive: Any = None,
        retry_errors: Any = None,
    ) -> Any:
        bound = CONTROL_MAX_RETRIES if max_retries is None else max_retries
        return super().ensure(  # type: ignore[misc]
            obj, fun, errback, bound, interval_start, interval_step, interval_max, on_revive, retry_errors
        )


class BoundedPooledConnection(_BoundedEnsure, PooledConnection):
    """What `BoundedRetryPool` hands out (Celery's producer pool publishes on these)."""


class BoundedRetryPool(ConnectionPool):
    def new(self) -> BoundedPooledConnection:
        return BoundedPooledConnection(self, **dict(self.connection._info(resolve=False)))  # as kombu's own `new`


class BoundedRetryConnection(_BoundedEnsure, Connection):
    """A kombu connection, and a pool of them, whose retries are bounded (`_BoundedEnsure`)."""

    def Pool(self, limit: int | None = None, **kwargs: Any) -> BoundedRetryPool:  # noqa: N802 (kombu's name)
        return BoundedRetryPool(self, limit=limit, **kwargs)


class BoundedRetryAMQP(AMQP):
    Connection = BoundedRetryConnection


def control_app(broker_url: str, app_name: str) -> Celery:
    """A Celery client app on Cairn's broker for remote control and events (never a worker).

    Every broker operation of it is bounded: a (re)connect is tried CONTROL_MAX_RETRIES + 1
    times (each within `broker_connection_timeout`), then the call raises (OperationalError)."""
    bound_header_depth()  # replies and events are decoded by py-amqp (header_depth.py)
    app = Celery(app_name, amqp=BoundedRetryAMQP)
    app.conf.update(celery_config(broker_url))
    # The (re)connects of a call: CONTROL_MAX_RETRIES more after the first, 0.5 s then 1 s apart.
    transport = {**app.conf.broker_transport_options, "max_retries": CONTROL_MAX_RETRIES, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 1}
    app.conf.broker_transport_options = transport
    return app


def task_for_shard(shard: dict[str, Any]) -> RunShard | RunFrontier:
    """The task that runs a shards document: its own `run_shard` for range and hash-mod shards; a
    `run_frontier` runner of its job for a lease-frontier item (the runner pulls every claimable
    item, this one included)."""
    if shard.get("strategy") == "lease_frontier":
        return RunFrontier(job_id=shard["job_id"], lane=int(shard.get("index", 0)))
    return RunShard(job_id=shard["job_id"], shard_key=shard["shard_key"])


class ShardDispatcher(Protocol):
    """What the scheduler and the DLQ handler need to run a shard: `ShardTaskSender` in
    production, a recording fake in unit tests."""

    async def dispatch(self, task: ShardTask, priority: int) -> None:
        """Put the task on the ingest queue (priority 0..MAX_PRIORITY); returns once the broker
        confirmed it, raises otherwise."""


class ShardTaskSender:
    """Sends shard tasks through Celery's own client, so each message is a genuine Celery task
    (protocol, headers, trace context via the Celery instrumentation), with publisher confirms."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    @classmethod
    def for_broker(cls, broker_url: str, app_name: str) -> "ShardTaskSender":
        app = Celery(app_name)
        app.conf.update(celery_config(broker_url))
        return cls(app)

    async def dispatch(self, task: ShardTask, priority: int) -> None:
        """Returns once the broker confirmed the task; raises if it did not."""
        # The Celery task name is the payload's message type (contracts.tasks), the route its own
        # (the one Celery would pick). kombu is blocking: off the event loop (contextvars, so the
        # trace, are copied along).
        route = task.route()
        await asyncio.to_thread(
            self._app.send_task,
            task.message_type,
            kwargs=task.model_dump(),
            priority=priority,
            exchange=route.exchange,
            routing_key=route.routing_key,
        )

    async def dispatch_many(self, tasks: Sequence[ShardTask], priority: int, timeout_s: float = 30.0) -> None:
        """Send every task, then wait for the broker's confirms of all of them together (publisher
        confirms pipelined on one channel: one round trip for the lot, not one per task).
        Returns once all are confirmed; raises `DispatchNotConfirmed` if any was nacked or not
        confirmed within `timeout_s` (then some may have been sent: a re-send is harmless, the
        worker's lease claim makes a second task of a shard a no-op)."""
        if tasks:
            await asyncio.to_thread(self._send_many, list(tasks), priority, timeout_s)

    def _send_many(self, tasks: list[ShardTask], priority: int, timeout_s: float) -> None:
        # Not the app's confirm_publish channel: py-amqp then waits for each confirm in turn.
        with self._app.connection_for_write(transport_options={"confirm_publish": False}) as connection:
            producer = connection.Producer()
            channel = producer.channel
            channel.confirm_select()
            pending: set[int] = set()
            nacked: list[int] = []

            def settle(tag: int, multiple: bool, nack: bool) -> None:
                done = {t for t in pending if t <= tag} if multiple else {tag}
                pending.difference_update(done)
                if nack:
                    nacked.extend(done)

            channel.events["basic_ack"].add(lambda tag, multiple: settle(tag, multiple, False))
            channel.events["basic_nack"].add(lambda tag, multiple: settle(tag, multiple, True))
            for tag, task in enumerate(tasks, start=1):  # a fresh confirm channel numbers its publishes from 1
                route = task.route()
                pending.add(tag)
                self._app.send_task(
                    task.message_type, kwargs=task.model_dump(), priority=priority,
                    exchange=route.exchange, routing_key=route.routing_key, producer=producer,
                )
            deadline = time.monotonic() + timeout_s
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DispatchNotConfirmed(f"{len(pending)} of {len(tasks)} task(s) not confirmed in {timeout_s} s")
                try:
                    connection.drain_events(timeout=remaining)
                except TimeoutError:  # socket.timeout: the loop's deadline decides
                    continue
            if nacked:
                raise DispatchNotConfirmed(f"{len(nacked)} of {len(tasks)} task(s) nacked by the broker")


class DispatchNotConfirmed(Exception):
    """The broker nacked, or did not confirm in time, some tasks of a bulk dispatch."""


async def dispatch_all(dispatcher: ShardDispatcher, tasks: Sequence[ShardTask], priority: int) -> None:
    """Send `tasks` with confirms: pipelined when the dispatcher can (`dispatch_many`), else one
    by one (test doubles that implement `dispatch` only)."""
    many = getattr(dispatcher, "dispatch_many", None)
    if many is not None:
        await many(tasks, priority)
        return
    for task in tasks:
        await dispatcher.dispatch(task, priority)
