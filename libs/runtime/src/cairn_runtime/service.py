"""How an asyncio service process starts and runs: logging, tracing, metrics (`run_service`), then
its handlers table and periodic loops (`serve`) until SIGTERM.

A service's main.py opens its resources, lists what it consumes (`Subscription` rows) and what it
does periodically (`Every` rows), and hands both to `serve`: the one place consumers are started
and loops are run and stopped.
"""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractQueue

from cairn_runtime.amqp import Publisher
from cairn_runtime.consumer import ContractConsumer, Subscription
from cairn_runtime.instrumentation import instrument_clients
from cairn_runtime.log import configure_logging
from cairn_runtime.metrics import serve_metrics
from cairn_runtime.settings import ServiceSettings
from cairn_runtime.tracing import setup_tracing

logger = logging.getLogger(__name__)


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


async def run_every(interval_s: float, fn: Callable[[], Awaitable[object]], *, what: str) -> None:
    """Call `fn` forever, `interval_s` seconds apart; runs until cancelled.

    `fn` may return a float: the seconds to wait before its next call instead (the due-retry
    dispatcher sleeps until the next retry is due). Any other result (None, a bool) means
    `interval_s`. An exception is logged (`what` names the pass) and the next call comes
    `interval_s` later: one failed pass never stops the loop."""
    while True:
        delay_s = interval_s
        try:
            result = await fn()
        except Exception:
            logger.exception("%s failed", what)
        else:
            if isinstance(result, float):
                delay_s = result
        await asyncio.sleep(delay_s)


@dataclass(frozen=True)
class Every:
    """One row of a service's periodic table: `run_every(interval_s, fn, what=what)`."""

    interval_s: float
    fn: Callable[[], Awaitable[object]]
    what: str


async def serve(
    stop: asyncio.Event,
    subscriptions: Iterable[Subscription[Any]],
    loops: Iterable[Every] = (),
    *,
    service: str,
    queues: Mapping[str, AbstractQueue],
    publisher: Publisher,
) -> None:
    """Consume every subscription's queue (from `queues`, as `declare_topology` returns them)
    through a `ContractConsumer` that dead-letters with `publisher` as `service`, run every loop,
    and return once `stop` is set, the loops cancelled. The consumers end with their connection,
    which the caller closes."""
    tasks: list[asyncio.Task[None]] = []
    try:
        for row in subscriptions:
            consumer = ContractConsumer(service=service, queue=queues[row.queue], model=row.model, handler=row.handler, publisher=publisher)
            await consumer.start()
            logger.info("consuming %s", row.queue)
        for loop in loops:
            tasks.append(asyncio.create_task(run_every(loop.interval_s, loop.fn, what=loop.what), name=loop.what))
            logger.info("%s every %.1f s", loop.what, loop.interval_s)
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
