"""Real servers for tests: an nx-27017 MongoDB-wire process, a RabbitMQ vhost, a Redis prefix.

Tests use a real MongoDB when MONGODB_URI is set, and otherwise an nx-27017 process started here
(see shared MONGO-COMPAT.md). RabbitMQ and Redis are the machine's; each run isolates itself in
its own vhost and key prefix and removes them afterwards.
"""

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.1)


def _nx_executable() -> str:
    local = Path(sys.executable).with_name("nx-27017")
    return str(local) if local.exists() else (shutil.which("nx-27017") or "nx-27017")


class MongoStandIn:
    """An nx-27017 server process with its own data directory and port; can be killed and restarted."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                _nx_executable(),
                "--data-dir", str(self.data_dir),
                "--host", "127.0.0.1",
                "-p", str(self.port),
                "--log-file", str(self.data_dir / "nx.log"),
                "--pid-file", str(self.data_dir / "nx.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


class RedisServer:
    """A redis-server process of the test's own (no persistence) that can be killed and restarted."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir), "--logfile", str(self.work_dir / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def rabbitmq_vhost(name: str, user: str = "guest") -> Iterator[str]:
    """A fresh vhost on the local broker, deleted afterwards with everything in it."""
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield name
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", name)


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Delete the run's keys: `<prefix>:…` and those of prefixes derived from it (`<prefix>-gwapi:…`)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class RabbitNode:
    """A RabbitMQ node of a test's own (own name, ports, data and config), so a test can stop
    and restart a real broker without touching the machine's shared one."""

    def __init__(self, base_dir: Path, name: str) -> None:
        self.base_dir = base_dir
        self.node = f"{name}@localhost"
        self.port = free_port()
        self._dist_port = free_port()

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base_dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base_dir / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
        }

    def start(self, timeout_s: float = 90) -> None:
        if not (self.base_dir / "rabbitmq.conf").exists():
            for sub in ("mnesia", "log"):
                (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
            (self.base_dir / "enabled_plugins").write_text("[].\n")
            # The machine's /etc/rabbitmq/rabbitmq.conf may pin 5672: this node gets its own.
            (self.base_dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
            )
            if os.geteuid() == 0:  # the server drops to the rabbitmq user
                for path in [self.base_dir, *self.base_dir.rglob("*")]:
                    shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60)
        # -detached returns before the node exists; the AMQP listener opens last in its boot.
        wait_for_port("127.0.0.1", self.port, timeout_s)
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "-q", "await_startup", "--timeout", str(int(timeout_s))],
            env=self._env(), check=True, capture_output=True, timeout=timeout_s + 10,
        )

    def stop(self) -> None:
        """Stop the whole node (the Erlang VM too); durable queues and messages stay on disk."""
        subprocess.run(["rabbitmqctl", "-n", self.node, "-q", "stop"], env=self._env(), capture_output=True, timeout=120)

    def restart(self) -> None:
        self.stop()
        self.start()

    def queue_depth(self, queue: str, vhost: str = "/") -> int:
        out = subprocess.run(
            ["rabbitmqctl", "-n", self.node, "-q", "list_queues", "-p", vhost, "name", "messages"],
            env=self._env(), check=True, capture_output=True, text=True, timeout=60,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        raise LookupError(f"no queue {queue}")
