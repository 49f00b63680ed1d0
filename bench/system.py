"""The bench's own copy of Cairn, on the servers `make up` runs, isolated from everything else.

`make up` starts RabbitMQ, Redis, the MongoDB server (nx-27017 on 127.0.0.1:27017 unless
MONGODB_URI is set) and one set of the four services. A benchmark has to vary what those
services cannot (worker processes, lease settings, a switch in the worker), so the bench starts
its own Cairn processes from the same virtualenv and the same entry points, pointed at:

- the same MongoDB server, in a database of its own (`cairn_bench_<run>`), dropped afterwards;
- the same RabbitMQ, in a vhost of its own (`cairn-bench-<run>`), deleted afterwards;
- the same Redis, under a key prefix of its own, deleted afterwards.

The `make up` services stay idle meanwhile: nothing the bench does reaches their vhost or
database. Every wait is bounded; every process the bench starts is stopped by its own pid.
"""

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from kombu import Connection
from pymongo import MongoClient
from pymongo.database import Database

from bench.env import ROOT, mongo_server_info, rabbitmq_info
from bench.procs import CpuMeter, Proc
from cairn_testkit.servers import delete_redis_prefix, free_port, rabbitmq_vhost

logger = logging.getLogger(__name__)

QUEUE_INGEST = "cairn.ingest"
QUEUE_COMMANDS = "cairn.scheduler.commands"
SETTLED_CORES = 0.25  # CPU used by other programs below which the machine counts as quiet

# Variables of the caller's shell that must not leak into the bench's services.
_SCRUB = ("PROMETHEUS_MULTIPROC_DIR", "CAIRN_METRICS_PORT", "CAIRN_HTTP_PORT", "CAIRN_LOCAL_PROCESS")


@dataclass
class BenchContext:
    run_id: str
    out_dir: Path
    mongodb_uri: str
    database: str
    vhost: str
    amqp_host: str
    redis_url: str
    redis_prefix: str
    mongo: dict[str, Any]
    rabbit: dict[str, Any]
    client: MongoClient
    procs: list[Proc] = field(default_factory=list)
    settle_s: float = 5.0  # longest wait for a quiet machine before one measurement
    settle_budget_s: float = 60.0  # and in total over the whole bench run
    settled_s: float = 0.0
    # Set: services are started through `bench.counted`, which counts their MongoDB commands,
    # AMQP publishes and Celery tasks into this directory (the `scaling` scenario's counts).
    counts_dir: Path | None = None
    _token: str | None = None

    def api_headers(self) -> dict[str, str]:
        """An API key of the bench's own, when the gateway asks for one (no rate limit on it)."""
        if self._token is None:
            self._token = ""
            try:
                from cairn_contracts.store import API_KEYS
                from cairn_gateway.auth import new_key
            except ImportError:  # a gateway without API keys
                return {}
            document, self._token = new_key("default", ["submit", "read"], "make bench", rate_limit_per_minute=0)
            self.db[API_KEYS].insert_one(document)
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def settle(self) -> None:
        """Wait, within bounds, until other programs leave the CPU (mostly) to the measurement.

        The machine's cores are shared with whatever else runs there (another engineer's tests);
        a run that starts while they are busy measures them too. This does not make a busy
        machine quiet: every run's CPU use by others is recorded and the report flags it.
        """
        deadline = time.monotonic() + min(self.settle_s, max(0.0, self.settle_budget_s - self.settled_s))
        started = time.monotonic()
        while True:
            meter = self.cpu_meter(ours=list(self.procs)).start()
            time.sleep(0.25)
            other = meter.stop()
            if other["other"] / other["wall"] < SETTLED_CORES or time.monotonic() >= deadline:
                break
        self.settled_s += time.monotonic() - started

    # --- addresses -----------------------------------------------------------------------
    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.amqp_host}/{quote(self.vhost, safe='')}"

    @property
    def db(self) -> Database:
        return self.client[self.database]

    @property
    def records_db(self) -> Database:
        """Where Cairn's jobs of the bench's key (tenant `default`) store their records: the
        tenant's namespace database beside `db` (README "Tenancy"); the baselines write to `db`."""
        from cairn_contracts.tenancy import tenant_database

        return self.client[tenant_database(self.database, "default")]

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    def service_env(self, **overrides: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(
            {
                "MONGODB_URI": self.mongodb_uri,
                "CAIRN_MONGODB_DATABASE": self.database,
                "CAIRN_AMQP_URL": self.amqp_url,
                "CAIRN_REDIS_URL": self.redis_url,
                "CAIRN_REDIS_PREFIX": self.redis_prefix,
                "CAIRN_LOG_FORMAT": "text",
                "CAIRN_LOG_LEVEL": "INFO",
                "CAIRN_TRACE_EXPORTER": "none",
                "CAIRN_METRICS_PORT": "0",
                "CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS": "true",  # the http_json scenario's API is on loopback
                # BENCH_SERVICE_PYTHONPATH (optional): source directories put first, e.g. another
                # tree's libs/*/src and services/*/src, to measure that code with this bench.
                "PYTHONPATH": os.pathsep.join([p for p in os.environ.get("BENCH_SERVICE_PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]),
            }
        )
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    # --- processes -----------------------------------------------------------------------
    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        if self.counts_dir is not None and argv[1:2] == ["-m"] and argv[2].startswith("cairn_"):
            argv = [argv[0], "-m", "bench.counted", *argv[2:]]
            env = {**env, "CAIRN_BENCH_COUNTS_DIR": str(self.counts_dir)}
        proc = Proc(name, argv, env, self.log_dir / f"{name}.log", cwd=ROOT).start()
        self.procs.append(proc)
        return proc

    def stop(self, *procs: Proc | None) -> None:
        for proc in procs:
            if proc is not None:
                proc.stop()
                with contextlib.suppress(ValueError):
                    self.procs.remove(proc)

    def start_gateway(self, name: str = "gateway", module: str = "cairn_gateway.main", **env: Any) -> tuple[Proc, str]:
        port = free_port()
        proc = self.start(name, [sys.executable, "-m", module], self.service_env(CAIRN_HTTP_PORT=port, **env))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return proc, url
            if not proc.alive():
                break
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not become healthy:\n{proc.log_tail()}")

    def start_scheduler(self, **env: Any) -> Proc:
        before = self.consumers(QUEUE_COMMANDS)
        proc = self.start("scheduler", [sys.executable, "-m", "cairn_scheduler.main"], self.service_env(**env))
        self.wait_consumers(QUEUE_COMMANDS, before + 1, proc)
        return proc

    def start_worker(
        self, concurrency: int, name: str = "worker", module: str = "cairn_ingest_worker.main", **env: Any
    ) -> Proc:
        """A Cairn ingest worker (`python -m cairn_ingest_worker.main`, as `make up` runs it; `module`:
        another entry point, e.g. the benchmark-only `bench.uncheckpointed_worker`)."""
        prom_dir = self.out_dir / "prometheus" / f"{name}-{uuid.uuid4().hex[:6]}"
        prom_dir.mkdir(parents=True)
        before = self.consumers(QUEUE_INGEST)
        proc = self.start(
            name,
            [sys.executable, "-m", module],
            self.service_env(CAIRN_WORKER_CONCURRENCY=concurrency, PROMETHEUS_MULTIPROC_DIR=prom_dir, **env),
        )
        self.wait_consumers(QUEUE_INGEST, before + 1, proc)
        self.wait_pool(proc, concurrency)
        return proc

    def start_workers(self, names: list[str], concurrency: int = 1, **env: Any) -> dict[str, Proc]:
        """Several ingest workers started at once (CAIRN_WORKER_ID = bench-<name>); ready together."""
        before = self.consumers(QUEUE_INGEST)
        procs = {}
        for name in names:
            prom_dir = self.out_dir / "prometheus" / f"worker-{name}-{uuid.uuid4().hex[:6]}"
            prom_dir.mkdir(parents=True)
            procs[name] = self.start(
                f"worker-{name}",
                [sys.executable, "-m", "cairn_ingest_worker.main"],
                self.service_env(
                    CAIRN_WORKER_CONCURRENCY=concurrency, CAIRN_WORKER_ID=f"bench-{name}", PROMETHEUS_MULTIPROC_DIR=prom_dir, **env
                ),
            )
        for proc in procs.values():
            self.wait_consumers(QUEUE_INGEST, before + len(procs), proc, timeout_s=90)
            self.wait_pool(proc, concurrency)
        return procs

    def wait_pool(self, proc: Proc, children: int, timeout_s: float = 30) -> None:
        """Wait until a prefork worker has its pool processes (main + children in its session)."""
        deadline = time.monotonic() + timeout_s
        while len(proc.group_pids()) < children + 1:
            if time.monotonic() > deadline or not proc.alive():
                raise RuntimeError(f"{proc.name}: pool of {children} did not start:\n{proc.log_tail()}")
            time.sleep(0.1)

    # --- broker --------------------------------------------------------------------------
    def _queue_stats(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue in the bench vhost; None if it does not exist."""
        with Connection(self.amqp_url, connect_timeout=5) as conn:
            try:
                _, messages, consumers = conn.default_channel.queue_declare(queue=queue, passive=True)
            except Exception:  # 404: not declared yet
                return None
        return messages, consumers

    def consumers(self, queue: str) -> int:
        stats = self._queue_stats(queue)
        return stats[1] if stats else 0

    def queue_depth(self, queue: str) -> int:
        stats = self._queue_stats(queue)
        return stats[0] if stats else 0

    def wait_consumers(self, queue: str, count: int, proc: Proc, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.consumers(queue) < count:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: no consumer on {queue} after {timeout_s} s:\n{proc.log_tail()}")
            time.sleep(0.2)

    def purge(self, queue: str) -> int:
        with Connection(self.amqp_url, connect_timeout=5) as conn:
            try:
                return conn.default_channel.queue_purge(queue) or 0
            except Exception:
                return 0

    # --- jobs ----------------------------------------------------------------------------
    def submit(self, gateway_url: str, body: dict[str, Any]) -> str:
        response = httpx.post(f"{gateway_url}/task/start", json=body, headers=self.api_headers(), timeout=30)
        if response.status_code != 202:
            raise RuntimeError(f"POST /task/start answered {response.status_code}: {response.text[:500]}")
        return response.json()["task_id"]

    def wait_job(self, job_id: str, timeout_s: float, poll_s: float = 0.05, procs: list[Proc] | None = None) -> tuple[dict[str, Any], float]:
        """Poll the job document until it is terminal; returns it and the monotonic time it was seen so."""
        deadline = time.monotonic() + timeout_s
        jobs = self.db["jobs"]
        while True:
            doc = jobs.find_one({"_id": job_id}, {"spec": 0})
            now = time.monotonic()
            if doc is not None and doc.get("state") in ("SUCCESS", "FAILURE"):
                return doc, now
            if now > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in (procs or self.procs))
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s: {doc and doc.get('state')}\n{tails}")
            for proc in procs or []:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} died while job {job_id} ran:\n{proc.log_tail()}")
            time.sleep(poll_s)

    def drop(self, collection: str) -> None:
        self.db.drop_collection(collection)
        self.records_db.drop_collection(collection)

    # --- CPU -----------------------------------------------------------------------------
    def cpu_meter(self, **groups: list[Proc] | Proc | None) -> CpuMeter:
        """CPU per group: the MongoDB server and RabbitMQ (when local), the bench, and `groups`."""
        named: dict[str, Any] = {}
        if self.mongo.get("pid"):
            named["mongodb" if not self.mongo["stand_in"] else "stand_in"] = lambda pid=self.mongo["pid"]: [pid]
        if self.rabbit.get("pid"):
            named["rabbitmq"] = lambda pid=self.rabbit["pid"]: [pid]
        named["bench"] = lambda: [os.getpid()]
        for name, procs in groups.items():
            members = [procs] if isinstance(procs, Proc) else [p for p in (procs or []) if p is not None]
            named[name] = lambda members=members: [pid for p in members for pid in p.group_pids()]
        return CpuMeter(named)


def synthetic_job(
    *,
    records: int,
    record_size: int,
    shards: int,
    batch_size: int,
    key_prefix: str,
    collection: str,
    name: str,
    **params: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "pipeline": "synthetic",
        "params": {"count": records, "record_size": record_size, "key_prefix": key_prefix, **params},
        "sharding": {"strategy": "range", "shards": shards},
        "priority": 2,
        "batch_size": batch_size,
        "target_collection": collection,
    }


@contextlib.contextmanager
def bench_context(out_dir: Path, mongodb_uri: str, amqp_host: str, redis_url: str) -> Iterator[BenchContext]:
    run_id = uuid.uuid4().hex[:8]
    vhost = f"cairn-bench-{run_id}"
    mongo = mongo_server_info(mongodb_uri)
    client: MongoClient = MongoClient(mongodb_uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    ctx: BenchContext | None = None
    try:
        with rabbitmq_vhost(vhost):
            ctx = BenchContext(
                run_id=run_id,
                out_dir=out_dir,
                mongodb_uri=mongodb_uri,
                database=f"cairn_bench_{run_id}",
                vhost=vhost,
                amqp_host=amqp_host,
                redis_url=redis_url,
                redis_prefix=f"cairn-bench-{run_id}",
                mongo=mongo,
                rabbit={},
                client=client,
            )
            ctx.rabbit = rabbitmq_info(ctx.amqp_url)
            logger.info("bench run %s: database %s, vhost %s, MongoDB %s", run_id, ctx.database, vhost, mongo["label"])
            try:
                yield ctx
            finally:
                for proc in list(ctx.procs):
                    proc.stop()
                ctx.procs.clear()
    finally:
        if ctx is not None:
            with contextlib.suppress(Exception):
                client.drop_database(ctx.database)
            with contextlib.suppress(Exception):
                delete_redis_prefix(redis_url, ctx.redis_prefix)
        client.close()
