"""How an asyncio service process starts: logging, tracing, metrics, then its loop until SIGTERM."""

import asyncio
import signal
from collections.abc import Awaitable, Callable

from cairn_runtime.instrumentation import instrument_clients
from cairn_runtime.log import configure_logging
from cairn_runtime.metrics import serve_metrics
from cairn_runtime.settings import ServiceSettings
from cairn_runtime.tracing import setup_tracing


def run_service(
    settings: ServiceSettings,
    run: Callable[[asyncio.Event], Awaitable[None]],
    *,
    instrument: Callable[[], None] | None = None,
) -> None:
    """Set the process up from `settings` (and `instrument`, once tracing exists), then run
    `run(stop)` until SIGTERM or SIGINT sets `stop`."""
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    setup_tracing(settings.service_name, settings.trace_exporter, trace_file=settings.trace_file, otlp_endpoint=settings.otlp_endpoint)
    instrument_clients()
    if instrument is not None:
        instrument()
    serve_metrics(settings.metrics_port, settings.metrics_host)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

    asyncio.run(_main())
