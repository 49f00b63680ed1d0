"""BENCHMARK ONLY: the Cairn ingest worker in one process, profiled while it runs tasks.

`python -m bench.profile_worker` starts the production Celery app (`cairn_ingest_worker.celery_app`)
with the solo pool, so every task runs in this process, and:

- pyinstrument samples the process while a task runs (started at `task_prerun`, stopped at
  `task_postrun`; the sessions add up), skipping the first BENCH_PROFILE_SKIP_TASKS tasks
  (the warm-up);
- a pymongo CommandListener adds up the count and the duration of every MongoDB command the
  process sends (duration as pymongo measures it: from sending the command to its reply, i.e.
  the server's time plus the loopback network).

On exit (SIGTERM: Celery's warm shutdown) it writes, to BENCH_PROFILE_DIR: profile.txt,
profile.html, profile.json (time per code area) and mongo_commands.json.
"""

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from celery import signals
from pyinstrument import Profiler
from pymongo import monitoring

AREAS = (  # first match wins: (substring of the frame's file path, area)
    ("/pymongo/", "pymongo (encode, send, wait for the server, decode)"),
    ("/bson/", "BSON"),
    ("/cairn_ingest_worker/pipelines/", "pipeline: read and clean records"),
    ("/cairn_ingest_worker/", "Cairn worker code"),
    ("/cairn_runtime/", "Cairn worker code"),
    ("/cairn_contracts/", "Cairn worker code"),
    ("/prometheus_client/", "Prometheus metrics"),
    ("/opentelemetry/", "OpenTelemetry"),
    ("/celery/", "Celery, kombu, py-amqp"),
    ("/kombu/", "Celery, kombu, py-amqp"),
    ("/amqp/", "Celery, kombu, py-amqp"),
    ("/billiard/", "Celery, kombu, py-amqp"),
    ("/pydantic", "pydantic"),
    ("/logging/", "logging"),
)


class CommandTimes(monitoring.CommandListener):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self._lock:
            total = self.totals[event.command_name]
            total[0] += 1
            total[1] += event.duration_micros / 1e6

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        with self._lock:
            total = self.totals[event.command_name]
            total[0] += 1
            total[1] += event.duration_micros / 1e6
            total[2] += 1


def areas(frame: Any, inherited: str = "other (interpreter, stdlib, threads)") -> dict[str, float]:
    """Self time of every frame, added up by the code area its file belongs to."""
    path = frame.file_path or ""
    area = next((name for needle, name in AREAS if needle in path), None)
    if area is None:
        if "/site-packages/" in path:
            area = "other: " + path.split("/site-packages/", 1)[1].split("/", 1)[0]
        else:  # the standard library, built-ins and frames without a file work for their caller
            area = inherited
    totals: dict[str, float] = defaultdict(float)
    totals[area] += frame.total_self_time
    for child in frame.children:
        if child.is_synthetic:  # already in this frame's total_self_time
            continue
        for name, seconds in areas(child, area).items():
            totals[name] += seconds
    return totals


def main() -> None:
    out = Path(os.environ["BENCH_PROFILE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    skip = int(os.environ.get("BENCH_PROFILE_SKIP_TASKS", "0"))
    commands = CommandTimes()
    monitoring.register(commands)  # before the worker creates its MongoClient

    from cairn_contracts.topology import QUEUE_INGEST
    from cairn_ingest_worker.celery_app import app, settings

    profiler = Profiler(interval=0.001)
    state = {"seen": 0, "task_s": 0.0, "started": 0.0, "profiled": 0, "mongo_at_start": {}}

    @signals.task_prerun.connect(weak=False)
    def _start(**_: object) -> None:
        state["seen"] += 1
        if state["seen"] > skip:
            if state["profiled"] == 0:
                state["mongo_at_start"] = {k: list(v) for k, v in commands.totals.items()}
            state["started"] = time.perf_counter()
            profiler.start()

    @signals.task_postrun.connect(weak=False)
    def _stop(**_: object) -> None:
        if state["seen"] > skip and profiler.is_running:
            profiler.stop()
            state["task_s"] += time.perf_counter() - state["started"]
            state["profiled"] += 1

    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                f"--queues={QUEUE_INGEST}",
                f"--loglevel={settings.log_level}",
                f"--hostname=bench-profile@{settings.worker_id}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    except SystemExit:
        pass
    finally:
        if profiler.is_running:
            profiler.stop()
        start = state["mongo_at_start"]
        mongo = {
            name: {
                "count": int(total[0] - start.get(name, [0, 0.0, 0])[0]),
                "seconds": round(total[1] - start.get(name, [0, 0.0, 0])[1], 4),
                "failed": int(total[2] - start.get(name, [0, 0.0, 0])[2]),
            }
            for name, total in commands.totals.items()
        }
        (out / "mongo_commands.json").write_text(json.dumps(
            {"tasks_profiled": state["profiled"], "task_seconds": round(state["task_s"], 4), "commands": mongo}, indent=1
        ))
        session = profiler.last_session
        if session is not None:
            root = session.root_frame()
            (out / "profile.txt").write_text(profiler.output_text(unicode=True, color=False))
            (out / "profile-all-frames.txt").write_text(profiler.output_text(unicode=True, color=False, show_all=True))
            (out / "profile.html").write_text(profiler.output_html())
            by_area = areas(root) if root is not None else {}
            (out / "profile.json").write_text(json.dumps(
                {"duration_s": session.duration, "sample_count": session.sample_count,
                 "areas": dict(sorted(by_area.items(), key=lambda kv: -kv[1]))}, indent=1
            ))


if __name__ == "__main__":
    main()
