"""Prometheus exposition for processes that are not web apps, and the plumbing's own metrics.

Metric names are `cairn_*`; every service's metrics are listed in README.md (Observability).
"""

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Publisher confirms: the time from handing a message to the broker until it confirmed it (aio-pika
# publishes of the asyncio services, Celery task sends of the scheduler, the worker's kombu events).
PUBLISH_SECONDS = Histogram(
    "cairn_publish_confirm_seconds",
    "Publish until the broker's confirm",
    ["exchange"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PUBLISH_FAILURES = Counter("cairn_publish_failures_total", "Publishes the broker did not confirm", ["exchange"])


@contextmanager
def timed_publish(exchange: str) -> Iterator[None]:
    """Observe a confirmed publish's latency, or count it as failed if the block raises."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        PUBLISH_FAILURES.labels(exchange).inc()
        raise
    PUBLISH_SECONDS.labels(exchange).observe(time.perf_counter() - started)


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def reap_dead_processes(path: str | Path) -> list[int]:
    """Forget the live-mode gauge files of processes that no longer exist (a prefork child that
    was recycled or killed): their `livesum`/`liveall` samples must not count any more. Counter
    and histogram files stay, so totals survive the child that produced them."""
    dead = set()
    for entry in Path(path).iterdir():
        match = _LIVE_GAUGE_FILE.match(entry.name)
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in sorted(dead):
        multiprocess.mark_process_dead(pid, str(path))
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ReapingMultiProcessCollector(Collector):
    """MultiProcessCollector that first drops the live gauges of dead processes, on every scrape."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._collector = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Metric]:
        try:
            reap_dead_processes(self._path)
        except OSError:
            logger.warning("could not reap dead processes' metrics in %s", self._path, exc_info=True)
        return self._collector.collect()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on `port` (0: do not serve).

    With PROMETHEUS_MULTIPROC_DIR set (Celery's prefork children), the samples of every process
    are merged, so the figures survive the child that produced them.
    """
    if not port:
        return
    if path := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        registry.register(_ReapingMultiProcessCollector(path))
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics", host, port)
