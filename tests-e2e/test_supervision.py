"""`make up`'s local processes are supervised: one that exits, for any reason, comes back.

The real local path runs here: infra/local/up.sh (CAIRN_LOCAL=1) writes its supervisord
configuration and starts supervisord with the four services, in a run directory, on ports and
against a RabbitMQ vhost and MongoDB database of this test's own (a developer's `make up` and the
other suites are untouched); infra/local/down.sh stops it all. Faults are real SIGKILLs of a
service's main process.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pymongo import MongoClient

from cairn_testkit.fixtures import AMQP_HOST, TestEnvironment
from cairn_testkit.servers import free_port, rabbitmq_vhost
from harness import System

ROOT = Path(__file__).resolve().parents[1]
UP = ROOT / "infra" / "local" / "up.sh"
DOWN = ROOT / "infra" / "local" / "down.sh"
SUPERVISORCTL = Path(sys.executable).with_name("supervisorctl")


@dataclass
class LocalUp:
    """A running `make up` (local path) of this test module."""

    run_dir: Path
    env: dict[str, str]
    system: System  # HTTP helpers of the e2e harness, pointed at this gateway

    @property
    def supervisor_log(self) -> Path:
        return self.run_dir / "logs" / "supervisord.log"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SUPERVISORCTL), "-c", str(self.run_dir / "supervisord.conf"), *args],
            capture_output=True, text=True, timeout=30,
        )

    def pid(self, program: str) -> int:
        """The pid supervisord runs `program` as; 0 while it is not running."""
        out = self.ctl("pid", program).stdout.strip()
        return int(out) if out.isdigit() else 0

    def running(self, program: str) -> bool:
        return self.ctl("status", program).stdout.split()[1:2] == ["RUNNING"]

    def wait_for_restart(self, program: str, old_pid: int, timeout_s: float = 45) -> int:
        """The new pid of `program` once supervisord has it RUNNING again (startsecs passed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.pid(program)
            if pid and pid != old_pid and self.running(program):
                return pid
            time.sleep(0.3)
        raise AssertionError(f"{program} not running again {timeout_s} s after pid {old_pid} was killed\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def supervised_processes(run_dir: Path) -> list[int]:
    """Live pids carrying up.sh's marker for `run_dir` (supervisord and all it started)."""
    marker = f"CAIRN_SUPERVISOR={run_dir}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker in environ.read_bytes().split(b"\0"):
                stat = environ.with_name("stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(environ.parent.name))
    return pids


def run_script(script: Path, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


@pytest.fixture(scope="module")
def local_up(test_env: TestEnvironment, mongo_client: MongoClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalUp]:
    run_dir = tmp_path_factory.mktemp("make-up") / "run"
    database = f"{test_env.mongodb_database}_supervision"
    http_port = free_port()
    with rabbitmq_vhost(f"cairn-test-{test_env.run_id}-supervision") as vhost:
        amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"
        env = {
            **os.environ,
            **test_env.service_env(),
            "CAIRN_MONGODB_DATABASE": database,
            "CAIRN_AMQP_URL": amqp_url,
            "CAIRN_LOCAL": "1",  # the local-process path even where a Docker engine answers
            "CAIRN_UP_SKIP_INSTALL": "1",  # the venv this test runs in is synced already
            "CAIRN_RUN_DIR": str(run_dir),
            "CAIRN_HTTP_PORT": str(http_port),
            "CAIRN_SCHEDULER_METRICS_PORT": str(free_port()),
            "CAIRN_INGEST_WORKER_METRICS_PORT": str(free_port()),
            "CAIRN_DLQ_HANDLER_METRICS_PORT": str(free_port()),
            "CAIRN_STOP_TIMEOUT": "10",
            "CAIRN_UP_TIMEOUT": "120",  # generous: 2 cores shared with other suites
            "CAIRN_SUPERVISOR_STARTSECS": "2",  # RUNNING (and so restarted) 2 s after a start
            "CAIRN_LOG_FORMAT": "text",
            "CAIRN_WORKER_CONCURRENCY": "1",
        }
        system = System(base_url=f"http://127.0.0.1:{http_port}", db=mongo_client[database], vhost=vhost, amqp_url=amqp_url, env=env)
        try:
            up = run_script(UP, env, timeout_s=150)
            assert up.returncode == 0, f"up.sh failed\n{up.stdout}\n{up.stderr}"
            system.token = system.create_key("default", "admin", "supervision test")
            yield LocalUp(run_dir=run_dir, env=env, system=system)
        finally:
            # Safety net (test_make_down_stops_everything checks down.sh itself): whatever
            # survives down.sh is killed, so a failing test leaves nothing running.
            with contextlib.suppress(subprocess.TimeoutExpired):
                run_script(DOWN, env, timeout_s=60)
            for pid in supervised_processes(run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            mongo_client.drop_database(database)


def test_killed_ingest_worker_is_restarted_and_takes_work(local_up: LocalUp) -> None:
    old_pid = local_up.pid("cairn-ingest-worker")
    assert old_pid, local_up.ctl("status").stdout

    os.kill(old_pid, signal.SIGKILL)  # the main process only, as an OOM killer would

    new_pid = local_up.wait_for_restart("cairn-ingest-worker", old_pid)
    log = local_up.supervisor_log.read_text()
    assert "exited: cairn-ingest-worker (terminated by SIGKILL; not expected)" in log, log
    assert f"spawned: 'cairn-ingest-worker' with pid {new_pid}" in log, log
    # The restarted worker consumes: a job submitted now finishes.
    job_id = local_up.system.start_job({"pipeline": "synthetic", "params": {"count": 200}, "target_collection": "after_kill"})
    final = local_up.system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=90)
    assert final["state"] == "SUCCESS", f"{final}\n{local_up.logs()}"


def test_killed_gateway_is_restarted_and_answers(local_up: LocalUp) -> None:
    old_pid = local_up.pid("cairn-gateway")
    assert old_pid, local_up.ctl("status").stdout

    os.kill(old_pid, signal.SIGKILL)

    new_pid = local_up.wait_for_restart("cairn-gateway", old_pid)
    log = local_up.supervisor_log.read_text()
    assert "exited: cairn-gateway (terminated by SIGKILL; not expected)" in log, log
    assert f"spawned: 'cairn-gateway' with pid {new_pid}" in log, log
    local_up.system.wait_for(
        lambda: _healthz(local_up.system.base_url) == 200, "the restarted gateway's /healthz to answer 200", timeout_s=30
    )
    with local_up.system.client() as client:
        assert client.get("/v1/jobs").status_code == 200


def test_make_down_stops_everything(local_up: LocalUp) -> None:
    """Runs last: down.sh leaves no process of this supervisord alive, supervisord included."""
    assert supervised_processes(local_up.run_dir), "nothing supervised runs before down.sh"

    down = run_script(DOWN, local_up.env, timeout_s=60)

    assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
    assert supervised_processes(local_up.run_dir) == [], f"{down.stdout}\n{down.stderr}"
    assert _healthz(local_up.system.base_url) is None


def _healthz(base_url: str) -> int | None:
    """The status of GET /healthz; None when nothing answers."""
    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code
    except httpx.HTTPError:
        return None
