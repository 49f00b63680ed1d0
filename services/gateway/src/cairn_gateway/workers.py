"""Worker control: Celery's remote control over RabbitMQ, and the per-shard terminate/revoke.

The gateway talks to the ingest workers only through the broker, as `celery inspect` /
`celery control` do: a broadcast on the `celery.pidbox` exchange, replies on a reply queue. Celery's
control client is blocking, so every call runs in a thread (`asyncio.to_thread`) and waits at most
`timeout_s` for replies (a worker that does not answer in time is left out, not waited for).

Terminate (a shard's run stopped now, its lease released, the batch in flight not committed):

1. the checkpoint's fencing token is set to `T + 1` (conditional on holding at most the run's
   token `T`: a bundle's first claim adopts its checkpoint only with its first commit): from now
   on the run's commit of its batch in flight is refused, wherever it is;
2. the shard moves, in one conditional update on (`RUNNING`, token `T`), to `RETRY` due now
   ("ready": the scheduler sends its task; the run's attempt is given back) or to `CANCELLED`, its
   token bumped too (the run's later lease writes are refused) and its lease dropped; if the shard
   moved meanwhile (finished, taken over) the checkpoint's earlier token is restored and 409 answered;
3. the run is interrupted at once by Cairn's remote-control command `cairn_terminate_shard` in the
   worker holding it (worker/control.py: SIGUSR1 to that pool process, Celery's soft time limit);
   if it does not answer, the run still stops at its next heartbeat or commit, both fenced;
4. a `CANCELLED` shard is announced (`ShardFinished`) so the job rolls up now.

Worker heartbeats come from Celery's worker events (`worker-heartbeat`, every 2 s), captured by
`HeartbeatMonitor` in a background thread.
"""

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from celery import Celery
from kombu.exceptions import OperationalError
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.messages import ShardFinished
from cairn_contracts.states import WAITING_SHARD_STATES, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, SHARDS, checkpoint_id
from cairn_gateway.errors import Conflict, Invalid, NotConfirmed, NotFound
from cairn_runtime.amqp import Publisher
from cairn_runtime.celery_config import WORKER_HOSTNAME_PREFIX, worker_hostname

logger = logging.getLogger(__name__)

TERMINATE_SHARD = "cairn_terminate_shard"  # the worker's command (cairn_ingest_worker.control)
# Beyond the reply timeout, how long a control call may take to reach the broker before 503.
BROKER_GRACE_S = 5.0
CONTROL_THREADS = 4  # concurrent control calls; more wait for a thread (within their timeout)
INSPECT_KINDS = ("active", "reserved", "scheduled", "stats", "registered", "revoked", "active_queues")
Then = Literal["ready", "cancelled"]
T = TypeVar("T")


class HeartbeatMonitor:
    """The local time each worker's last event (heartbeat, online) was received; forgets a worker
    on its `worker-offline`. A daemon thread consuming the `celeryev` exchange's `worker.#` events;
    it reconnects after a broker outage (ages grow meanwhile)."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="worker-heartbeats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=3)

    def age_s(self, hostname: str) -> float | None:
        """Seconds since the worker's last heartbeat was received; None if none was seen."""
        seen = self._seen.get(hostname)
        return None if seen is None else max(0.0, time.time() - seen)

    def _on_event(self, event: dict[str, Any]) -> None:
        hostname = event.get("hostname")
        if not isinstance(hostname, str):
            return
        if event.get("type") == "worker-offline":
            self._seen.pop(hostname, None)
        else:
            self._seen[hostname] = time.time()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._app.connection_for_read() as connection:
                    self._receiver = self._app.events.Receiver(connection, handlers={"*": self._on_event}, routing_key="worker.#")
                    if self._stop.is_set():
                        return
                    self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as error:  # broker away: retry; the list shows growing ages meanwhile
                logger.warning("worker heartbeats: event capture stopped (%s); reconnecting", error)
                self._stop.wait(2.0)


@dataclass
class WorkerControl:
    """Remote control of the ingest workers, and the shard transitions that go with terminate.

    `app`: a Celery client app on Cairn's broker (never a worker); `timeout_s`: how long a
    broadcast collects replies."""

    app: Celery
    db: AsyncDatabase
    publisher: Publisher
    timeout_s: float = 1.0
    heartbeats: HeartbeatMonitor | None = None
    # A call's thread can outlive its 503 by a few reconnect attempts (`control_app` bounds what
    # kombu would retry for the whole outage): those threads get their own small pool, never
    # asyncio's default executor (DNS resolution of pymongo and aio-pika runs there).
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="worker-control")
    )

    async def _blocking(self, call: Callable[[], T]) -> T:
        """Run a blocking Celery control call in a thread of `executor`. Raises `NotConfirmed`
        (503) if the broker cannot be reached or the call outlasts the reply timeout plus
        BROKER_GRACE_S (a call still queued for a thread then never runs)."""
        context = contextvars.copy_context()
        try:
            async with asyncio.timeout(self.timeout_s + BROKER_GRACE_S):
                return await asyncio.get_running_loop().run_in_executor(self.executor, context.run, call)
        except (TimeoutError, OSError, OperationalError) as error:
            raise NotConfirmed(f"worker control: the broker (RabbitMQ) does not answer: {type(error).__name__}: {error}") from error

    # --- inspect -----------------------------------------------------------------------------
    async def _inspect(self, kind: str, destination: list[str] | None = None) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            inspector = self.app.control.inspect(destination=destination, timeout=self.timeout_s)
            return getattr(inspector, kind)() or {}

        return await self._blocking(call)

    async def list_workers(self) -> list[dict[str, Any]]:
        """Every worker that answered within the timeout, by name: `{"hostname", "worker_id",
        "pool": {"implementation", "max_concurrency", "processes": [pid]}, "autoscale": {"min", "max"} | None,
        "running": [{"task_id", "task", "pid", "shard_key" | None, "job_id", "started_at" (epoch s)}],
        "running_shards": [shard_key] (leases held, from MongoDB), "processed": {task name: count},
        "uptime_s", "heartbeat_age_s" (None: no heartbeat seen yet)}`."""
        stats, active = await asyncio.gather(self._inspect("stats"), self._inspect("active"))
        # Leases held, by worker id (`taken_by` is `<worker id>/<pid>`): one scan of RUNNING shards.
        held: dict[str, list[str]] = {}
        async for shard in self.db[SHARDS].find({"state": ShardState.RUNNING}, {"shard_key": 1, "taken_by": 1}):
            holder = str(shard.get("taken_by") or "").rpartition("/")[0]
            held.setdefault(holder, []).append(shard["shard_key"])
        workers = []
        for hostname in sorted(stats):
            info = stats[hostname] or {}
            worker_id = hostname.removeprefix(WORKER_HOSTNAME_PREFIX)
            pool = info.get("pool") or {}
            autoscaler = info.get("autoscaler") or {}
            workers.append(
                {
                    "hostname": hostname,
                    "worker_id": worker_id,
                    "pool": {
                        "implementation": pool.get("implementation"),
                        "max_concurrency": pool.get("max-concurrency"),
                        "processes": list(pool.get("processes") or []),
                    },
                    "autoscale": {"min": autoscaler.get("min"), "max": autoscaler.get("max")} if autoscaler else None,
                    "running": [_task_view(task) for task in active.get(hostname) or []],
                    "running_shards": sorted(held.get(worker_id, [])),
                    "processed": dict(info.get("total") or {}),
                    "uptime_s": info.get("uptime"),
                    "heartbeat_age_s": self.heartbeats.age_s(hostname) if self.heartbeats else None,
                }
            )
        return workers

    async def inspect(self, hostname: str, kind: str) -> Any:
        """One worker's answer to `celery inspect <kind>` (one of INSPECT_KINDS); tasks in
        active/reserved/scheduled as `_task_view` shapes them. Raises `Invalid` (kind),
        `NotFound` (no such worker answered)."""
        if kind not in INSPECT_KINDS:
            raise Invalid(f"kind must be one of {', '.join(INSPECT_KINDS)}", ("path", "kind"), value=kind)
        replies = await self._inspect(kind, [hostname])
        if hostname not in replies:
            raise NotFound(f"no worker {hostname} answered within {self.timeout_s:g} s", hostname)
        answer = replies[hostname]
        if kind in ("active", "reserved"):
            return [_task_view(task) for task in answer or []]
        if kind == "scheduled":
            return [{**_task_view(entry.get("request") or {}), "eta": entry.get("eta"), "priority": entry.get("priority")} for entry in answer or []]
        return answer

    # --- control -----------------------------------------------------------------------------
    async def control(self, hostname: str, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Send a remote-control command to one worker and return its reply (`{"ok": ...}` or
        `{"error": ...}`). Raises `NotFound` if it did not answer, `Conflict` if it refused."""

        def call() -> list[dict[str, Any]]:
            return self.app.control.broadcast(
                command, arguments=arguments, destination=[hostname], reply=True, timeout=self.timeout_s
            ) or []

        replies = await self._blocking(call)
        for reply in replies:
            if hostname in reply:
                answer = reply[hostname]
                if isinstance(answer, dict) and "error" in answer:
                    raise Conflict(f"{hostname} refused {command}: {answer['error']}", hostname)
                return answer if isinstance(answer, dict) else {"ok": answer}
        raise NotFound(f"no worker {hostname} answered {command} within {self.timeout_s:g} s", hostname)

    async def grow(self, hostname: str, n: int) -> dict[str, Any]:
        return await self.control(hostname, "pool_grow", {"n": n})

    async def shrink(self, hostname: str, n: int) -> dict[str, Any]:
        return await self.control(hostname, "pool_shrink", {"n": n})

    async def autoscale(self, hostname: str, max_processes: int, min_processes: int) -> dict[str, Any]:
        if min_processes > max_processes:
            raise Invalid("min must not exceed max", ("body", "min"), value=min_processes)
        return await self.control(hostname, "autoscale", {"max": max_processes, "min": min_processes})

    async def pool_restart(self, hostname: str) -> dict[str, Any]:
        return await self.control(hostname, "pool_restart", {"reload": False})

    async def shutdown(self, hostname: str) -> dict[str, Any]:
        """Warm shutdown: the worker stops consuming, finishes (or hands off) its running tasks
        within its slice and exits. Celery's shutdown sends no reply: this answers once sent."""
        await self._ping(hostname)
        await self._blocking(lambda: self.app.control.broadcast("shutdown", destination=[hostname], reply=False))
        return {"ok": "shutdown requested"}

    async def _ping(self, hostname: str) -> None:
        def call() -> list[dict[str, Any]]:
            return self.app.control.ping(destination=[hostname], timeout=self.timeout_s) or []

        if not any(hostname in reply for reply in await self._blocking(call)):
            raise NotFound(f"no worker {hostname} answered within {self.timeout_s:g} s", hostname)

    # --- shards ------------------------------------------------------------------------------
    async def terminate_shard(self, shard_key: str, then: Then, actor: str) -> dict[str, Any]:
        """Stop a running shard now (see the module docstring). Returns `{"shard_key", "state"
        (RETRY | CANCELLED), "fencing_token", "worker", "interrupted": bool, "reply"}`.
        Raises `NotFound` (no such shard), `Conflict` (not running, or it moved meanwhile)."""
        shards, checkpoints = self.db[SHARDS], self.db[CHECKPOINTS]
        shard = await shards.find_one({"_id": shard_key})
        if shard is None:
            raise NotFound(f"no shard {shard_key}", shard_key)
        if shard.get("state") != ShardState.RUNNING:
            hint = " (use revoke for a shard not started yet)" if shard.get("state") in WAITING_SHARD_STATES else ""
            raise Conflict(f"shard {shard_key} is {shard.get('state')}, not RUNNING: nothing to terminate{hint}", shard_key)
        if shard.get("cancel_requested"):
            # Its job is being cancelled: a shard sent back to ready would never be dispatched
            # (cancelled jobs' shards never start) and the job would never finish cancelling.
            then = "cancelled"
        token = int(shard["fencing_token"])
        taken_by = str(shard.get("taken_by") or "")
        fence = uuid.uuid4().hex
        # 1. Fence the checkpoint first: the run's commit of its batch in flight is refused from here.
        # `$lte`: a bundle's first claim adopts its checkpoint only with its first commit.
        checkpoint = await checkpoints.find_one_and_update(
            {"_id": checkpoint_id(shard_key), "fencing_token": {"$lte": token}},
            {"$set": {"fencing_token": token + 1, "fenced_by": fence}},
            projection={"records_done": 1, "fencing_token": 1},
            return_document=ReturnDocument.BEFORE,  # the token held before: restored if the shard moved meanwhile
        )
        if checkpoint is None:
            raise Conflict(f"shard {shard_key} was taken over meanwhile (its checkpoint holds a newer token)", shard_key)
        # 2. One conditional update of the shard: the run's token and state, or nothing.
        now = clock.utcnow()
        now_ms = clock.to_ms(now)
        fields: dict[str, Any] = {
            "lease_until": None,
            "taken_by": None,
            "terminated_at_ms": now_ms,
            "terminated_by": actor,
            "terminated_then": then,
            "terminated_token": token,
            "terminated_worker": taken_by,
        }
        increments: dict[str, int] = {"fencing_token": 1, "terminations": 1}
        if then == "ready":
            fields.update(state=ShardState.RETRY, next_retry_at=now, next_retry_at_ms=now_ms, last_error=f"terminated by {actor}")
            if not shard.get("bundle_claim"):  # a bundle's claim not started has no attempt counted yet
                increments["attempts"] = -1  # not the shard's failure: its attempt is given back
        else:
            fields.update(state=ShardState.CANCELLED, cancelled_at_ms=now_ms, finished_at=now)
        won = await shards.find_one_and_update(
            {"_id": shard["_id"], "state": ShardState.RUNNING, "fencing_token": token}, {"$set": fields, "$inc": increments}
        )
        if won is None:
            await checkpoints.update_one(
                {"_id": checkpoint["_id"], "fencing_token": token + 1, "fenced_by": fence},
                {"$set": {"fencing_token": int(checkpoint.get("fencing_token") or 0)}, "$unset": {"fenced_by": ""}},
            )
            raise Conflict(f"shard {shard_key} finished or was taken over meanwhile; nothing terminated", shard_key)
        logger.warning("shard %s terminated by %s (then %s); token %d -> %d", shard_key, actor, then, token, token + 1)
        # 3. Interrupt the run now (best effort: its fenced writes stop it anyway). Not a shard a
        # bundle claimed and has not started (`bundle_claim` still set): the signal would stop
        # the shard that bundle runs now; this one's start is refused by its token.
        if shard.get("bundle_claim"):
            interrupted, reply = False, "claimed by a bundle that has not started it: its start is refused by the fencing token"
        else:
            interrupted, reply = await self._interrupt(taken_by, shard_key, shard["job_id"])
        # 4. A cancelled shard is terminal: the job rolls up now.
        if then == "cancelled":
            await self._announce_cancelled(shard, int(checkpoint.get("records_done") or 0))
        return {
            "shard_key": shard_key,
            "state": str(fields["state"]),
            "fencing_token": token + 1,
            "worker": taken_by or None,
            "interrupted": interrupted,
            "reply": reply,
        }

    async def revoke_shard(self, shard_key: str, actor: str) -> dict[str, Any]:
        """Cancel a shard that has not started (PLANNED, QUEUED or RETRY, or taken by a bundle
        that has not started it yet): its task finds it unclaimable and is acked without running
        (a bundle's start of it is refused: its fencing token moves). Raises `NotFound`, `Conflict`
        (running or finished: a running shard is terminated instead)."""
        revoked = {
            "$set": {
                "state": ShardState.CANCELLED,
                "cancelled_at_ms": clock.now_ms(),
                "finished_at": clock.utcnow(),
                "revoked_by": actor,
                "lease_until": None,
            }
        }
        shard = await self.db[SHARDS].find_one_and_update(
            {"_id": shard_key, "state": {"$in": state_values(WAITING_SHARD_STATES)}}, revoked, return_document=ReturnDocument.AFTER
        )
        if shard is None:
            shard = await self._revoke_bundled(shard_key, revoked)
        if shard is None:
            existing = await self.db[SHARDS].find_one({"_id": shard_key}, {"state": 1})
            if existing is None:
                raise NotFound(f"no shard {shard_key}", shard_key)
            raise Conflict(f"shard {shard_key} is {existing.get('state')}: only a shard not started can be revoked", shard_key)
        logger.warning("shard %s revoked by %s before it ran", shard_key, actor)
        await self._announce_cancelled(shard, 0)
        return {"shard_key": shard_key, "state": ShardState.CANCELLED.value}

    async def _revoke_bundled(self, shard_key: str, revoked: dict[str, Any]) -> dict[str, Any] | None:
        """Revoke a shard a bundle claimed and has not started (RUNNING, `bundle_claim` set), by
        compare-and-set on that claim; None if it is not one (or it started meanwhile)."""
        shard = await self.db[SHARDS].find_one({"_id": shard_key}, {"state": 1, "fencing_token": 1, "bundle_claim": 1})
        if shard is None or shard.get("state") != ShardState.RUNNING or not shard.get("bundle_claim"):
            return None
        return await self.db[SHARDS].find_one_and_update(
            {"_id": shard_key, "state": ShardState.RUNNING, "fencing_token": shard.get("fencing_token"), "bundle_claim": shard["bundle_claim"]},
            {**revoked, "$set": {**revoked["$set"], "taken_by": None}, "$inc": {"fencing_token": 1}},
            return_document=ReturnDocument.AFTER,
        )

    async def _interrupt(self, taken_by: str, shard_key: str, job_id: str) -> tuple[bool, Any]:
        worker_id, _, pid = taken_by.rpartition("/")
        if not worker_id or not pid.isdigit():
            return False, f"no worker process recorded for the run ({taken_by!r})"
        try:
            reply = await self.control(
                worker_hostname(worker_id), TERMINATE_SHARD, {"pid": int(pid), "shard_key": shard_key, "job_id": job_id}
            )
        except (NotFound, Conflict, NotConfirmed) as error:
            # The run stops at its next heartbeat or commit, both refused by the new token. Not a
            # 503 when the broker is away: the shard is already stopped in MongoDB.
            return False, str(error)
        return True, reply.get("ok")

    async def _announce_cancelled(self, shard: dict[str, Any], records: int) -> None:
        event = ShardFinished(job_id=shard["job_id"], shard_key=shard["shard_key"], outcome="cancelled", records_done=records)
        try:
            await self.publisher.publish(event, correlation_id=shard["job_id"])
        except Exception as error:  # the scheduler's periodic roll-up still sees the shard
            logger.warning("shard %s: ShardFinished not published (%s); the job rolls up at the next reconcile", shard["shard_key"], error)


def _task_view(task: dict[str, Any]) -> dict[str, Any]:
    """A task of `inspect active/reserved`: `{"task_id", "task", "pid", "shard_key", "job_id",
    "lane", "started_at" (epoch s | None), "acknowledged"}`."""
    raw = task.get("kwargs")
    kwargs: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {
        "task_id": task.get("id"),
        "task": task.get("name"),
        "pid": task.get("worker_pid"),
        "shard_key": kwargs.get("shard_key"),
        "job_id": kwargs.get("job_id"),
        "lane": kwargs.get("lane"),
        "started_at": task.get("time_start"),
        "acknowledged": task.get("acknowledged"),
    }
