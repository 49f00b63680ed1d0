"""HTTP request metrics, labelled by route template (not raw path) to keep cardinality bounded."""

import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response

REQUESTS = Counter("cairn_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("cairn_http_request_duration_seconds", "HTTP request latency", ["method", "route"])


class HttpMetricsMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
        return response


async def metrics_page(_: Request) -> Response:
    """`GET /metrics`: the process's metrics in Prometheus' text format, at exactly that path
    (a mount at /metrics would answer it with a redirect to /metrics/, which curl and some
    scrapers do not follow)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
