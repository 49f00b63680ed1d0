"""BENCHMARK ONLY: run a Cairn service with its MongoDB commands, AMQP publishes and Celery task
deliveries counted, so the `scaling` scenario can say what a shard costs in round trips, not only
in (noisy) seconds.

    python -m bench.counted cairn_ingest_worker.main     # any module with a main(), run as __main__

With `CAIRN_BENCH_COUNTS_DIR` set, every process of the service (a prefork worker's pool processes
too: counters are reset in a forked child) writes its counters to `<dir>/<name>-<pid>.json` every
`_DUMP_EVERY_S` and at exit, where `<name>` is `CAIRN_BENCH_COUNTS_NAME` (default: the module):

    {"mongo": {"find jobs": [count, seconds], ...}, "publish": {"cairn.events shard.succeeded": n},
     "tasks": {"cairn.ingest.run_shard": n}}

`mongo` keys are `<command> <collection>` with the count and the summed client-side latency (s);
`publish` counts kombu publishes (Celery tasks, the worker's events; those a bundle publishes
together through `BrokerPublisher.publish_all` too) and aio-pika publishes (the
asyncio services) by exchange and routing key; `tasks` counts Celery task deliveries by name.
Nothing else changes: the service's own code and wiring run as `make up` runs them.
"""

import atexit
import json
import logging
import os
import runpy
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import monitoring

logger = logging.getLogger(__name__)

_DUMP_EVERY_S = 0.5
_lock = threading.Lock()
_mongo: Counter[str] = Counter()
_mongo_s: Counter[str] = Counter()
_publish: Counter[str] = Counter()
_tasks: Counter[str] = Counter()
_pending: dict[tuple[int, int], str] = {}  # (connection id hash, request id) -> key, while in flight
_dumper_pid: int | None = None


class _CommandCounter(monitoring.CommandListener):
    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        target = event.command.get(name)
        key = f"{name} {target}" if isinstance(target, str) else name
        with _lock:
            _pending[(hash(event.connection_id), event.request_id)] = key
        _ensure_dumper()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._ended(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._ended(event)

    def _ended(self, event: monitoring.CommandSucceededEvent | monitoring.CommandFailedEvent) -> None:
        with _lock:
            key = _pending.pop((hash(event.connection_id), event.request_id), event.command_name)
            _mongo[key] += 1
            _mongo_s[key] += event.duration_micros / 1e6


def _count_publish(key: str) -> None:
    with _lock:
        _publish[key] += 1
    _ensure_dumper()


def _patch_publishers() -> None:
    from kombu import Producer

    publish = Producer.publish

    def counted_publish(self: Producer, body: Any, routing_key: str = "", *args: Any, **kwargs: Any) -> Any:
        exchange = kwargs.get("exchange")
        name = getattr(exchange, "name", exchange) or getattr(self.exchange, "name", "") or ""
        _count_publish(f"{name or '(default)'} {routing_key or kwargs.get('routing_key', '')}")
        return publish(self, body, routing_key, *args, **kwargs)

    Producer.publish = counted_publish  # type: ignore[method-assign]
    _patch_pipelined_publishes()
    try:
        import aio_pika
    except ImportError:
        return
    exchange_publish = aio_pika.Exchange.publish

    async def counted_exchange_publish(self: Any, message: Any, routing_key: str, *args: Any, **kwargs: Any) -> Any:
        _count_publish(f"{self.name or '(default)'} {routing_key}")
        return await exchange_publish(self, message, routing_key, *args, **kwargs)

    aio_pika.Exchange.publish = counted_exchange_publish  # type: ignore[method-assign]


def _patch_pipelined_publishes() -> None:
    """The worker's `BrokerPublisher.publish_all` publishes on a channel of its own, past kombu's
    Producer: each of its messages is counted here instead."""
    try:
        from cairn_ingest_worker.publisher import BrokerPublisher
    except ImportError:
        return
    pipelined = BrokerPublisher._publish_pipelined

    def counted_pipelined(self: Any, messages: Any) -> None:
        pipelined(self, messages)  # a failed attempt's messages are counted by the fallback's publishes
        for message in messages:
            route = message.route()
            _count_publish(f"{route.exchange} {route.routing_key}")

    BrokerPublisher._publish_pipelined = counted_pipelined  # type: ignore[method-assign]


def _count_tasks() -> None:
    from celery.signals import task_prerun

    def on_task(sender: Any = None, **_: Any) -> None:
        with _lock:
            _tasks[getattr(sender, "name", str(sender))] += 1
        _ensure_dumper()

    task_prerun.connect(on_task, weak=False)


def _path() -> Path | None:
    directory = os.environ.get("CAIRN_BENCH_COUNTS_DIR")
    if not directory:
        return None
    name = os.environ.get("CAIRN_BENCH_COUNTS_NAME", "service")
    return Path(directory) / f"{name}-{os.getpid()}.json"


def dump() -> None:
    """Write this process's counters (atomically: a reader never sees half a file)."""
    path = _path()
    if path is None:
        return
    with _lock:
        data = {
            "mongo": {k: [_mongo[k], round(_mongo_s[k], 6)] for k in _mongo},
            "publish": dict(_publish),
            "tasks": dict(_tasks),
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _ensure_dumper() -> None:
    global _dumper_pid
    if _dumper_pid == os.getpid():
        return
    _dumper_pid = os.getpid()

    def loop() -> None:
        while True:
            time.sleep(_DUMP_EVERY_S)
            try:
                dump()
            except OSError:
                logger.exception("bench counters: dump failed")

    threading.Thread(target=loop, name="bench-counts", daemon=True).start()


def _reset_in_child() -> None:
    global _dumper_pid
    with _lock:
        for counter in (_mongo, _mongo_s, _publish, _tasks):
            counter.clear()
        _pending.clear()
    _dumper_pid = None


def read_counts(directory: Path) -> dict[str, dict[str, Any]]:
    """Every service's counters in `directory`, summed over its processes: {name: counters}."""
    out: dict[str, dict[str, Any]] = {}
    for path in directory.glob("*.json"):
        name = path.stem.rsplit("-", 1)[0]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        into = out.setdefault(name, {"mongo": {}, "publish": {}, "tasks": {}})
        for key, (count, seconds) in data.get("mongo", {}).items():
            c, s = into["mongo"].get(key, (0, 0.0))
            into["mongo"][key] = (c + count, s + seconds)
        for section in ("publish", "tasks"):
            for key, count in data.get(section, {}).items():
                into[section][key] = into[section].get(key, 0) + count
    return out


def difference(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What was counted between two `read_counts`."""
    out: dict[str, dict[str, Any]] = {}
    for name, counts in after.items():
        prior = before.get(name, {"mongo": {}, "publish": {}, "tasks": {}})
        mongo = {}
        for key, (count, seconds) in counts["mongo"].items():
            c, s = prior["mongo"].get(key, (0, 0.0))
            if count - c:
                mongo[key] = (count - c, round(seconds - s, 6))
        out[name] = {
            "mongo": mongo,
            "publish": {k: v - prior["publish"].get(k, 0) for k, v in counts["publish"].items() if v - prior["publish"].get(k, 0)},
            "tasks": {k: v - prior["tasks"].get(k, 0) for k, v in counts["tasks"].items() if v - prior["tasks"].get(k, 0)},
        }
    return out


def main() -> None:
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    os.environ.setdefault("CAIRN_BENCH_COUNTS_NAME", module.split(".")[0].removeprefix("cairn_"))
    monitoring.register(_CommandCounter())
    _patch_publishers()
    _count_tasks()
    os.register_at_fork(after_in_child=_reset_in_child)
    atexit.register(dump)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
