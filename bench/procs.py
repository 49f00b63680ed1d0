"""Processes the bench starts, and CPU accounting from /proc (Linux).

Every process is started in its own session, so a stop or a SIGKILL reaches the whole group
(a Celery worker's prefork children) and nothing else. CPU time is read from /proc/<pid>/stat,
so the bench can say where the machine's two cores went during a run: the MongoDB stand-in, the
workers, RabbitMQ, the bench itself, or something else on the machine.
"""

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """One command in its own session, logging to a file; stopped or killed as a group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        logger.debug("%s: started pid %d", self.name, self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_pids(self) -> list[int]:
        """The live processes of this session (the process and its children)."""
        if self.process is None:
            return []
        return session_pids(self.process.pid)

    def kill(self) -> None:
        """SIGKILL the whole group: no chance to clean up, as in a crash."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 20) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: SIGKILL", self.name, timeout_s)
        # Leftovers of the group (e.g. pool children of a worker stopped mid-task).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, needle: str, timeout_s: float, *, after: int = 0) -> None:
        """Wait until the log (from byte `after`) contains `needle`; RuntimeError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log_text()[after:]:
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no {needle!r} in its log after {timeout_s} s:\n{self.log_tail()}")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # after the name: state(0) ppid(1) pgrp(2) session(3)
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (threads included), or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime and stime are fields 14 and 15 of /proc/pid/stat, i.e. 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return (total - idle) / CLK_TCK, total / CLK_TCK


def cmdline(pid: int) -> list[str]:
    try:
        return [p for p in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if p]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (any local address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        with contextlib.suppress(FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in inodes:
                        return int(entry)
    return None


@dataclass
class CpuMeter:
    """CPU seconds per named group of processes over an interval, plus the machine's total.

    `groups` maps a name to a function returning the group's pids (re-evaluated at start and at
    stop, so processes that start during the interval count too). `other` is what the machine
    spent outside every group: other programs (e.g. someone else's test run) and the kernel.
    """

    groups: dict[str, Callable[[], Iterable[int]]]
    _start: dict[int, float] = field(default_factory=dict)
    _start_machine: tuple[float, float] = (0.0, 0.0)
    _t0: float = 0.0

    def start(self) -> "CpuMeter":
        self._start = {}
        for pids in self.groups.values():
            for pid in pids():
                value = process_cpu_s(pid)
                if value is not None:
                    self._start[pid] = value
        self._start_machine = machine_cpu_s()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        busy1, total1 = machine_cpu_s()
        result: dict[str, float] = {}
        counted: set[int] = set()
        for name, pids in self.groups.items():
            spent = 0.0
            for pid in pids():
                if pid in counted:
                    continue
                value = process_cpu_s(pid)
                if value is None:
                    continue
                counted.add(pid)
                spent += value - self._start.get(pid, 0.0)
            result[name] = round(max(spent, 0.0), 3)
        busy = busy1 - self._start_machine[0]
        cores = (total1 - self._start_machine[1]) / wall if wall > 0 else float(os.cpu_count() or 1)
        result["machine_busy"] = round(busy, 3)
        result["other"] = round(max(busy - sum(v for k, v in result.items() if k != "machine_busy"), 0.0), 3)
        result["wall"] = round(wall, 3)
        result["cores"] = round(cores, 2)
        return result
