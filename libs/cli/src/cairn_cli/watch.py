"""`cairn jobs watch`: live Rich progress bars for a job and its shards until the job ends.

The job's bar is its percent of the key range covered by committed batches (the gateway's
`progress`); each shard's bar is its checkpoint cursor within its key range. Records/s comes from
the records committed between polls (a sliding window of `RATE_WINDOW_S`); the ETA is Rich's,
from the bar's own rate. A poll is one `GET /v1/jobs/{id}`.
"""

import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn

from cairn_cli.client import CairnClient

TERMINAL_STATES = frozenset({"SUCCESS", "FAILURE", "CANCELLED"})
RATE_WINDOW_S = 10.0
STATE_STYLES = {
    "SUCCESS": "green", "SUCCEEDED": "green", "FAILURE": "red", "FAILED": "red", "CANCELLED": "yellow",
    "CANCELLING": "yellow", "RETRY": "magenta", "RUNNING": "cyan", "STARTED": "cyan", "WAITING": "blue",
}


class RateMeter:
    """Records per second over the last `window_s` seconds of samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, records: int) -> float:
        """Record the running total `records` now; returns the rate (records/s; 0 until two samples)."""
        now = self._clock()
        self._samples.append((now, records))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()
        first_t, first_n = self._samples[0]
        return (records - first_n) / (now - first_t) if now > first_t else 0.0


def shard_fraction(shard: dict[str, Any]) -> tuple[int, int]:
    """(keys covered, keys in range) of a shard, from its checkpoint cursor; a finished shard
    counts as complete, one without a range as 0 of 1."""
    start, end = shard.get("range_start"), shard.get("range_end")
    if not isinstance(start, int) or not isinstance(end, int) or end <= start:
        return (1, 1) if shard.get("state") == "SUCCEEDED" else (0, 1)
    if shard.get("state") == "SUCCEEDED":
        return end - start, end - start
    cursor = shard.get("cursor")
    covered = min(max(int(cursor) - start, 0), end - start) if isinstance(cursor, int) else 0
    return covered, end - start


def _label(text: str, state: str) -> str:
    style = STATE_STYLES.get(state, "white")
    return f"{text} [{style}]{state}[/{style}]"


def watch_job(
    client: CairnClient, job_id: str, console: Console, *, interval_s: float = 1.0, max_shards: int = 20, timeout_s: float | None = None
) -> dict[str, Any]:
    """Show the bars until the job is finished (or `timeout_s` passes); returns the last job
    detail. Raises `ApiError` if the gateway refuses (404: no such job for this key)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[records]:>10,} rec"),
        TextColumn("{task.fields[rate]:>9,.1f} rec/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    meters: dict[str, RateMeter] = {}
    tasks: dict[str, TaskID] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as progress:
        while True:
            job = client.get(f"/v1/jobs/{quote(job_id, safe='')}", shard_limit=max_shards)
            state = str(job.get("state"))
            records = int(job.get("records_done") or 0)
            rate = meters.setdefault(job_id, RateMeter()).add(records)
            label = _label(f"job {job.get('name') or job_id}", state)
            if job_id not in tasks:
                tasks[job_id] = progress.add_task(label, total=100.0, records=records, rate=rate)
            progress.update(tasks[job_id], description=label, completed=float(job.get("progress") or 0.0), records=records, rate=rate)
            for shard in job.get("shards") or []:
                key = str(shard.get("shard_key"))
                covered, size = shard_fraction(shard)
                done = int(shard.get("records_done") or 0)
                shard_rate = meters.setdefault(key, RateMeter()).add(done)
                shard_label = _label(f"  shard {shard.get('index', key)}", str(shard.get("state")))
                if key not in tasks:
                    tasks[key] = progress.add_task(shard_label, total=size, records=done, rate=shard_rate)
                progress.update(tasks[key], description=shard_label, completed=covered, total=size, records=done, rate=shard_rate)
            progress.refresh()
            if state in TERMINAL_STATES or (deadline is not None and time.monotonic() > deadline):
                return job
            time.sleep(interval_s)
