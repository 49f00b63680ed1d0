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
import itertools
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


_JOB_NUMBERS = itertools.count()  # every submitted job distinct within a bench process


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
                    ctx.settle()
                    meter = ctx.cpu_meter(server=proc).start()
                    figures = asyncio.run(load(url, clients, args.requests, ctx.api_headers()))
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


async def load(url: str, clients: int, requests: int, headers: dict[str, str]) -> dict[str, Any]:
    """`clients` clients, each with its own connection (an httpx.AsyncClient of one connection:
    one shared pool for 64 clients costs the load generator more than the server), each sending
    one request at a time until `requests` are answered."""
    latencies: list[float] = []
    errors = 0
    last_status = 202
    remaining = requests
    warmed = 0

    async def one_client(warm_up: int) -> None:
        nonlocal remaining, errors, last_status, warmed
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as client:
            async def send() -> tuple[float, int]:
                # Every job a distinct one, as from real clients (a gateway may refuse duplicates).
                body = {**BODY, "params": {**BODY["params"], "start": next(_JOB_NUMBERS)}}
                t0 = time.perf_counter()
                response = await client.post("/task/start", json=body)
                return time.perf_counter() - t0, response.status_code

            for _ in range(warm_up):  # the connection, and the server's caches
                await send()
            warmed += 1
            await ready.wait()
            while remaining > 0:
                remaining -= 1
                latency, status = await send()
                latencies.append(latency)
                if status != 202:
                    errors += 1
                    last_status = status

    ready = asyncio.Event()
    tasks = [asyncio.create_task(one_client(2)) for _ in range(clients)]
    # Start the clock once every client is warm (bounded: a dead server fails the gather below).
    deadline = time.monotonic() + 60
    while warmed < clients and time.monotonic() < deadline and not any(t.done() for t in tasks):
        await asyncio.sleep(0.02)
    started = time.perf_counter()
    ready.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    wall = time.perf_counter() - started
    if errors > len(latencies) // 100:
        raise RuntimeError(f"submit: {errors} of {len(latencies)} requests to {url} were not answered 202 (last: {last_status})")
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
