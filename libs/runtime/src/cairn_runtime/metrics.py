"""Prometheus exposition for processes that are not web apps."""

import logging
import os

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

logger = logging.getLogger(__name__)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on `port` (0: do not serve).

    With PROMETHEUS_MULTIPROC_DIR set (Celery's prefork children), the samples of every process
    are merged, so the figures survive the child that produced them.
    """
    if not port:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics", host, port)
