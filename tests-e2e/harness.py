"""The whole system as separate processes, for end-to-end tests.

Each service runs as its own OS process (its own session, so a kill reaches its children: the
Celery worker's prefork pool), pointed at this run's MongoDB database, RabbitMQ vhost and Redis
prefix. Processes can be killed and restarted by the tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pymongo.collection import Collection
from pymongo.database import Database

from cairn_contracts.pipelines import PIPELINES
from cairn_contracts.store import DEFAULT_TENANT
from cairn_contracts.tenancy import tenant_database
from cairn_testkit.servers import free_port

MODULES = {
    "gateway": "cairn_gateway.main",
    "scheduler": "cairn_scheduler.main",
    "ingest_worker": "cairn_ingest_worker.main",
    "dlq_handler": "cairn_dlq_handler.main",
}


class ServiceProcess:
    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal_group(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the service and every process it started (no chance to clean up)."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 15) -> None:
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        # Leftover pool children of a worker that was stopped mid-task.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class System:
    base_url: str
    db: Database
    vhost: str
    amqp_url: str
    env: dict[str, str]
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    rabbit_node: str | None = None  # a test's own RabbitMQ node, else the machine's
    # Observability: every service appends its finished spans to `trace_file` (JSON lines); the
    # services other than the gateway serve /metrics on `metrics_ports[name]` (the gateway on its
    # HTTP port).
    trace_file: Path | None = None
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # The API key every `client()` sends (an admin+operator key of the `default` tenant, made with the
    # gateway's bootstrap command once the services run); `create_key` makes others.
    token: str | None = None

    # --- storage ---------------------------------------------------------------------------------
    def records(self, collection: str, tenant: str = DEFAULT_TENANT) -> Collection:
        """A collection of a tenant's namespace database, where its jobs store their records and
        its mongo_range jobs read their sources (never `db`, which holds Cairn's control data)."""
        return self.db.client[tenant_database(self.db.name, tenant)][collection]

    # --- observability -------------------------------------------------------------------------
    def metrics_url(self, name: str) -> str:
        if name == "gateway":
            return f"{self.base_url}/metrics"
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def metrics_text(self, name: str) -> str:
        response = httpx.get(self.metrics_url(name), timeout=10, follow_redirects=True)  # the gateway's: /metrics/
        assert response.status_code == 200, response.text
        return response.text

    def spans(self) -> list[dict[str, Any]]:
        """Every span exported so far, in the order they ended."""
        if self.trace_file is None or not self.trace_file.exists():
            return []
        return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]

    # --- HTTP -------------------------------------------------------------------------------
    def client(self, token: str | None = None, *, auth: bool = True) -> httpx.Client:
        """An HTTP client of the gateway sending `token` (default: the system's admin key);
        `auth=False`: no Authorization header at all."""
        headers = {"Authorization": f"Bearer {token or self.token}"} if auth and (token or self.token) else {}
        return httpx.Client(base_url=self.base_url, timeout=30, headers=headers)

    def async_client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url, timeout=60, headers={"Authorization": f"Bearer {token or self.token}"}
        )

    def create_key(self, tenant: str = "default", scopes: str = "admin", name: str = "e2e", rate_limit: int | None = None) -> str:
        """A new API key, made by the gateway's bootstrap command (`python -m cairn_gateway.admin`)."""
        command = [sys.executable, "-m", "cairn_gateway.admin", "create-key", "--tenant", tenant, "--scopes", scopes, "--name", name]
        if rate_limit is not None:
            command += ["--rate-limit", str(rate_limit)]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def client_for(self, tenant: str, scopes: str = "submit,read") -> httpx.Client:
        """A client holding a new key of another tenant (or other scopes)."""
        return self.client(self.create_key(tenant, scopes, name=f"e2e {tenant}"))

    def start_job(self, body: dict[str, Any], **headers: str) -> str:
        with self.client() as client:
            response = client.post("/task/start", json=body, headers=headers)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    def status(self, job_id: str) -> dict[str, Any]:
        with self.client() as client:
            response = client.get(f"/task/status/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_state(
        self,
        job_id: str,
        states: set[str],
        timeout_s: float = 120,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_status:
                on_status(status)
            if status["state"] in states:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {status} after {timeout_s} s\n{self.logs()}")
            time.sleep(0.2)

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout_s: float = 60, poll_s: float = 0.1) -> Any:
        """The first truthy result of `predicate`, polled until `timeout_s`; fails with the logs."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self.logs()}")
            time.sleep(poll_s)

    # --- broker -------------------------------------------------------------------------------
    def queue_depth(self, queue: str) -> int:
        """Ready + unacknowledged messages of a queue, as the broker counts them."""
        node = ["-n", self.rabbit_node] if self.rabbit_node else []
        out = subprocess.run(
            ["rabbitmqctl", *node, "-q", "list_queues", "-p", self.vhost, "name", "messages"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        raise AssertionError(f"no queue {queue} in vhost {self.vhost}: {out}")

    def wait_until_drained(self, queue: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.queue_depth(queue) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{queue} not drained after {timeout_s} s")
            time.sleep(0.3)

    # --- processes ----------------------------------------------------------------------------
    def start_services(self, names: list[str] | None = None) -> None:
        started_ms = int(time.time() * 1000)
        for name in names or list(self.services):
            self.services[name].start()
        if names is None or "gateway" in names:
            self._wait_for_gateway()
            if self.token is None:
                self.token = self.create_key("default", "admin,operator", "e2e harness")
        if any(name.startswith("ingest_worker") for name in names or list(self.services)):
            self._wait_for_catalog(started_ms)

    def _wait_for_catalog(self, since_ms: int, timeout_s: float = 60) -> None:
        """Until a worker started now has announced its pipelines (the gateway refuses jobs of
        unannounced ones). Workers overwrite each other's entries: any announcement will do."""
        self.wait_for(
            lambda: self.db[PIPELINES].find_one({"announced_at_ms": {"$gte": since_ms - 1000}}), "the pipeline catalog", timeout_s
        )

    def stop_services(self) -> None:
        for service in self.services.values():
            service.stop()

    def _wait_for_gateway(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            gateway = self.services["gateway"].process
            if gateway is not None and gateway.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"gateway did not become healthy\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{s.log_tail()}" for name, s in self.services.items())


def build_system(
    base_env: dict[str, str],
    db: Database,
    vhost: str,
    amqp_url: str,
    work_dir: Path,
    *,
    workers: int = 1,
    schedulers: int = 1,
    overrides: dict[str, str] | None = None,
    rabbit_node: str | None = None,
) -> System:
    """The four services (and `workers` ingest worker instances: ingest_worker, ingest_worker_2…;
    `schedulers` scheduler instances: scheduler, scheduler_2…)."""
    port = free_port()
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prom_dir = work_dir / "prometheus"
    prom_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        **base_env,
        "CAIRN_HTTP_PORT": str(port),
        "CAIRN_LOG_FORMAT": "text",
        # Short leases and retries keep crash and retry scenarios to seconds.
        "CAIRN_LEASE_TTL_S": "4",
        "CAIRN_HEARTBEAT_INTERVAL_S": "1",
        "CAIRN_MAX_ATTEMPTS": "3",
        "CAIRN_RETRY_BASE_DELAY_S": "0.2",
        "CAIRN_RETRY_MAX_DELAY_S": "2",
        "CAIRN_RECONCILE_INTERVAL_S": "2",
        "CAIRN_RELAY_AFTER_S": "3",
        "CAIRN_WORKER_CONCURRENCY": "2",
        "CAIRN_TRACE_EXPORTER": "file",  # every service appends to the same JSON-lines file
        "CAIRN_TRACE_FILE": str(work_dir / "spans.jsonl"),
        "CAIRN_GAUGES_INTERVAL_S": "0.5",
        "CAIRN_SCHEDULE_TICK_S": "0.5",  # schedules fire within half a second of their time
        # The shared suite (concurrency and fuzz tests included) stays under the rate limit; the
        # limit itself is tested with a key of its own (`create_key(rate_limit=...)`).
        "CAIRN_RATE_LIMIT_PER_MINUTE": "100000",
        # Test-only hook: the workers also load the suite's test pipelines (flaky_source.py).
        "CAIRN_TEST_PIPELINE_MODULE": "flaky_source",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
        **(overrides or {}),
    }
    services = {}
    for name, module in MODULES.items():
        services[name] = ServiceProcess(name, module, dict(env), log_dir)
    for number in range(1, workers + 1):
        name = "ingest_worker" if number == 1 else f"ingest_worker_{number}"
        worker_prom_dir = prom_dir / name
        worker_prom_dir.mkdir(exist_ok=True)
        worker_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(worker_prom_dir), "CAIRN_WORKER_ID": f"worker-{number}"}
        services[name] = ServiceProcess(name, MODULES["ingest_worker"], worker_env, log_dir)
    for number in range(2, schedulers + 1):
        services[f"scheduler_{number}"] = ServiceProcess(f"scheduler_{number}", MODULES["scheduler"], dict(env), log_dir)
    metrics_ports = {name: free_port() for name in services if name != "gateway"}
    for name, metrics_port in metrics_ports.items():
        services[name].env["CAIRN_METRICS_PORT"] = str(metrics_port)
    return System(
        trace_file=Path(env["CAIRN_TRACE_FILE"]),
        metrics_ports=metrics_ports,
        base_url=f"http://127.0.0.1:{port}",
        db=db,
        vhost=vhost,
        amqp_url=amqp_url,
        env=env,
        services=services,
        rabbit_node=rabbit_node,
    )


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
