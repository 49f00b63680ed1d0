"""Scenario 3: the submit path, POST /task/start, at 1, 8 and 64 concurrent clients.

Cairn: the bench's gateway (production code: MongoDB insert, publish with confirm, then the
`command_published_at` update), with no scheduler running, so commands just queue in the bench
vhost (purged afterwards) and the rest of the system does not compete for the CPU.

Baseline: `bench/baseline/submit_app.py`, the same app with a submit that only publishes,
without a confirm and without touching MongoDB.

Load: an httpx.AsyncClient in the bench process, `clients` coroutines each sending one request
at a time (closed loop) until `--requests` are answered; a warm-up of 2 requests per client is
not counted. Every answer must be 202. The load generator shares the 2 cores with the server;
its CPU share is reported.
"""

import argparse
import asyncio
import logging
import time
from typing import Any

import httpx

from bench.scenarios.ingest import _ints
from bench.stats import fmt_summary, percentile, summary
from bench.system import QUEUE_COMMANDS, BenchContext

logger = logging.getLogger(__name__)

NAME = "submit"

BODY = {
    "name": "bench submit",
    "pipeline": "synthetic",
    "params": {"count": 10, "record_size": 10},
    "sharding": {"strategy": "range", "shards": 1},
    "priority": 2,
    "batch_size": 10,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("submit (scenario 3)")
    group.add_argument("--clients", type=_ints, default=[1, 8, 64], help="concurrent clients (default 1,8,64)")
    group.add_argument("--requests", type=int, default=400, help="requests per measurement (default 400)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    gateway, cairn_url = ctx.start_gateway()
    baseline, baseline_url = ctx.start_gateway(name="submit-baseline", module="bench.baseline.submit_app")
    variants = {"cairn": (cairn_url, gateway), "baseline": (baseline_url, baseline)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {str(c): [] for c in args.clients} for v in variants}
    try:
        for rep in range(args.repeats):
            for variant, (url, proc) in variants.items() if rep % 2 == 0 else reversed(variants.items()):
                for clients in args.clients:
                    meter = ctx.cpu_meter(server=proc).start()
                    figures = asyncio.run(load(url, clients, args.requests))
                    figures["cpu"] = meter.stop()
                    runs[variant][str(clients)].append(figures)
                    logger.info("submit: %s, %d clients, run %d: %.0f req/s, p99 %.1f ms", variant, clients, rep + 1, figures["rps"], figures["p99_ms"])
                    if ctx.queue_depth(QUEUE_COMMANDS) > 20_000:
                        ctx.purge(QUEUE_COMMANDS)
    finally:
        ctx.stop(gateway, baseline)
        purged = ctx.purge(QUEUE_COMMANDS)
        ctx.db["jobs"].delete_many({"name": BODY["name"]})
    out: dict[str, Any] = {"params": {"clients": args.clients, "requests": args.requests, "repeats": args.repeats}, "purged": purged}
    for variant, levels in runs.items():
        out[variant] = {
            c: {
                "rps": summary([r["rps"] for r in rs]),
                "p50_ms": summary([r["p50_ms"] for r in rs]),
                "p95_ms": summary([r["p95_ms"] for r in rs]),
                "p99_ms": summary([r["p99_ms"] for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "runs": rs,
            }
            for c, rs in levels.items()
        }
    return out


async def load(url: str, clients: int, requests: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def send() -> tuple[float, int]:
            t0 = time.perf_counter()
            response = await client.post("/task/start", json=BODY)
            return time.perf_counter() - t0, response.status_code

        await asyncio.gather(*(send() for _ in range(2 * clients)))  # warm-up: connections, caches
        latencies: list[float] = []
        errors = 0
        remaining = requests

        async def one_client() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                latency, status = await send()
                latencies.append(latency)
                if status != 202:
                    errors += 1

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), timeout=300)
        wall = time.perf_counter() - started
    if errors:
        logger.warning("submit: %d of %d requests to %s were not 202", errors, requests, url)
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies),
        "wall_s": round(wall, 3),
        "rps": len(latencies) / wall,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "errors": errors,
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["clients", "Cairn req/s", "p50/p95/p99 ms", "baseline req/s", "p50/p95/p99 ms", "durability costs"]
    rows = []
    for c in result["cairn"]:
        a, b = result["cairn"][c], result["baseline"][c]
        lat = lambda s: f"{s['p50_ms']['median']:.1f} / {s['p95_ms']['median']:.1f} / {s['p99_ms']['median']:.1f}"  # noqa: E731
        cost = (1 - a["rps"]["median"] / b["rps"]["median"]) * 100 if b["rps"]["median"] else 0
        rows.append([c, fmt_summary(a["rps"]), lat(a), fmt_summary(b["rps"]), lat(b), f"{cost:.0f}% of req/s"])
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    top = str(max(int(c) for c in result["cairn"]))
    return {
        "clients": int(top),
        "cairn_rps": result["cairn"][top]["rps"]["median"],
        "cairn_p99_ms": result["cairn"][top]["p99_ms"]["median"],
        "baseline_rps": result["baseline"][top]["rps"]["median"],
    }
