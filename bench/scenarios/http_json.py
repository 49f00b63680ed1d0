"""Scenario http_json: records/s of an `http_json` job reading a local paged JSON API, beside a
plain httpx loop fetching the same pages and writing the same store.

The API is `cairn_testkit.paged_server` run as a process of its own (so its CPU is its own),
serving `--http-records` records in pages of `--http-page-size` (page-number paging, no
latency, no faults). Cairn: POST /task/start of an `http_json` job over pages [1, pages], in
`--http-shards` page-range shards, batches of `--http-batch-pages` pages, write mode insert, with
one ingest worker of 1, 2 pool processes; the clock runs from the POST until the bench sees the
job SUCCESS. Baseline: one loop in the bench process, `httpx.Client.get` page after page and
`insert_many` of each page's records (same `_id`s, unordered) into a collection of the same
store; no checkpoints, no retries, no rate limit, no resume. Every stored record is counted.
"""

import argparse
import logging
import sys
import time
from typing import Any

import httpx

from bench.stats import fmt_summary, summary
from bench.system import BenchContext
from cairn_testkit.servers import free_port, wait_for_port

logger = logging.getLogger(__name__)

NAME = "http_json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http_json")
    group.add_argument("--http-records", type=int, default=20_000, help="records the local API serves (default 20,000)")
    group.add_argument("--http-page-size", type=int, default=100, help="records per page (default 100)")
    group.add_argument("--http-shards", type=int, default=4, help="page-range shards of the Cairn job (default 4)")
    group.add_argument("--http-batch-pages", type=int, default=5, help="pages per batch and checkpoint (default 5)")
    group.add_argument("--http-workers", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=[1, 2],
                       help="worker pool processes to measure (default 1,2)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    pages = -(-args.http_records // args.http_page_size)
    port = free_port()
    api = ctx.start(
        "paged-api",
        [sys.executable, "-m", "cairn_testkit.paged_server", "--total", str(args.http_records),
         "--page-size", str(args.http_page_size), "--port", str(port)],
        ctx.service_env(),
    )
    wait_for_port("127.0.0.1", port, timeout_s=30)
    api_url = f"http://127.0.0.1:{port}/pages"

    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    cairn: dict[str, Any] = {}
    for workers in args.http_workers:
        worker = ctx.start_worker(workers)
        _cairn_run(ctx, url, api_url, args, pages, tag=f"warm{workers}", worker=worker, scheduler=scheduler, api=api, records=None)
        runs = []
        for rep in range(args.repeats):
            runs.append(_cairn_run(ctx, url, api_url, args, pages, tag=f"w{workers}r{rep}", worker=worker, scheduler=scheduler, api=api))
            logger.info("http_json: cairn %d workers run %d: %.0f records/s", workers, rep + 1, runs[-1]["records_per_s"])
        ctx.stop(worker)
        cairn[str(workers)] = _summarise(runs)
    ctx.stop(gateway, scheduler)

    loop_runs = []
    for rep in range(args.repeats):
        loop_runs.append(_loop_run(ctx, api_url, args, pages, tag=f"r{rep}", api=api))
        logger.info("http_json: httpx loop run %d: %.0f records/s", rep + 1, loop_runs[-1]["records_per_s"])
    ctx.stop(api)
    loop = _summarise(loop_runs)
    ratio = {w: round(c["records_per_s"]["median"] / loop["records_per_s"]["median"], 2) for w, c in cairn.items() if loop["records_per_s"]["median"]}
    return {
        "params": {
            "records": args.http_records,
            "page_size": args.http_page_size,
            "pages": pages,
            "shards": args.http_shards,
            "batch_pages": args.http_batch_pages,
            "repeats": args.repeats,
        },
        "cairn": cairn,
        "httpx_loop": loop,
        "ratio": ratio,
    }


def _cairn_run(
    ctx: BenchContext, url: str, api_url: str, args: argparse.Namespace, pages: int, *, tag: str, worker: Any, scheduler: Any, api: Any,
    records: int | None = -1,
) -> dict[str, Any]:
    """One job over every page (`records=None`: a warm-up, not measured)."""
    collection = f"bench_http_{tag}"
    body = {
        "name": "bench http_json",
        "pipeline": "http_json",
        "params": {
            "url": api_url, "paging": "page", "page_size": args.http_page_size, "start": 1, "end": pages + 1,
            "records_path": "data.items", "id_path": "id",
        },
        "sharding": {"strategy": "range", "shards": args.http_shards},
        "batch_size": args.http_batch_pages * args.http_page_size,
        "write_mode": "insert",
        "target_collection": collection,
    }
    if records is not None:
        ctx.settle()
    meter = ctx.cpu_meter(workers=worker, scheduler=scheduler, api=api).start()
    started = time.monotonic()
    job_id = ctx.submit(url, body)
    job, finished = ctx.wait_job(job_id, timeout_s=120 + args.http_records / 200, procs=[worker, scheduler, api])
    cpu = meter.stop()
    stored = ctx.records_db[collection].count_documents({})
    ctx.drop(collection)
    if job["state"] != "SUCCESS" or stored != args.http_records:
        raise RuntimeError(f"http_json run {tag}: job {job['state']}, {stored} of {args.http_records} records stored")
    seconds = finished - started
    return {"records": stored, "seconds": round(seconds, 3), "records_per_s": stored / seconds, "cpu": cpu}


def _loop_run(ctx: BenchContext, api_url: str, args: argparse.Namespace, pages: int, *, tag: str, api: Any) -> dict[str, Any]:
    collection = f"bench_http_loop_{tag}"
    target = ctx.db[collection]
    ctx.settle()
    meter = ctx.cpu_meter(api=api).start()
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(30, connect=5)) as client:
        for page in range(1, pages + 1):
            response = client.get(api_url, params={"page": page, "per_page": args.http_page_size})
            response.raise_for_status()
            items = response.json()["data"]["items"]
            if items:
                target.insert_many([{**item, "_id": item["id"]} for item in items], ordered=False)
    seconds = time.monotonic() - started
    cpu = meter.stop()
    stored = target.count_documents({})
    ctx.drop(collection)
    if stored != args.http_records:
        raise RuntimeError(f"httpx loop run {tag}: {stored} of {args.http_records} records stored")
    return {"records": stored, "seconds": round(seconds, 3), "records_per_s": stored / seconds, "cpu": cpu}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": runs,
        "records_per_s": summary([r["records_per_s"] for r in runs]),
        "seconds": summary([r["seconds"] for r in runs]),
        "cpu_cores": {
            key: round(sum(r["cpu"].get(key, 0.0) for r in runs) / (sum(r["cpu"]["wall"] for r in runs) or 1), 2)
            for key in ("stand_in", "mongodb", "workers", "api", "bench", "other", "machine_busy")
            if runs and key in runs[0]["cpu"]
        },
    }


# --- reporting ---------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["reader", "records/s", "seconds", "vs httpx loop", "CPU cores: reader / API / store / other programs"]
    rows = []
    for w, cairn in result["cairn"].items():
        cores = cairn["cpu_cores"]
        rows.append([
            f"Cairn http_json, {w} worker process{'es' if w != '1' else ''}",
            fmt_summary(cairn["records_per_s"]),
            fmt_summary(cairn["seconds"], " s", 2),
            f"{result['ratio'].get(w, '-')}×",
            _cores(cores, "workers"),
        ])
    loop = result["httpx_loop"]
    cores = loop["cpu_cores"]
    rows.append([
        "plain httpx loop (1 process)",
        fmt_summary(loop["records_per_s"]),
        fmt_summary(loop["seconds"], " s", 2),
        "1×",
        _cores(cores, "bench"),
    ])
    return headers, rows


def _cores(cores: dict[str, float], reader: str) -> str:
    store = cores.get("stand_in", cores.get("mongodb", 0.0))
    return f"{cores.get(reader, 0):.2f} / {cores.get('api', 0):.2f} / {store:.2f} / {cores.get('other', 0):.2f}"


def headline(result: dict[str, Any]) -> dict[str, Any]:
    two = result["cairn"].get("2")
    return {
        "cairn_2_workers_records_per_s": two["records_per_s"]["median"] if two else None,
        "httpx_loop_records_per_s": result["httpx_loop"]["records_per_s"]["median"],
        "ratio_2_workers": result["ratio"].get("2"),
    }
