"""Scenario 1: ingest throughput end to end, Cairn vs the Celery-chunk peer (main baseline), one
Celery task per record (second line), and the store's own two-client insert_many limit.

Cairn: POST /task/start of a synthetic job (N records of `record_size` bytes in `shards` range
shards) to the bench's gateway, with a scheduler and one ingest worker of 1, 2, 4 prefork
processes (CAIRN_WORKER_CONCURRENCY); the clock runs from the POST until the bench sees the job
SUCCESS in MongoDB (polled every 50 ms). Every stored record is then counted.

Main baseline: `bench/baseline/celery_chunks.py`, the Celery app a competent user writes: one
`delay()` per 1,000 records, each task building its chunk and storing it with one unordered
`insert_many`; same records, same store, same worker processes; the clock runs from the first
`delay()` until all N records are in the collection.

Second line: `bench/baseline/celery_records.py`, one `delay()` per record, one `insert_one` per
task (the naive approach; fewer records per run, it is slow).

The store's limit: `bench/baseline/store_limit.py`, two client processes inserting the same N
records with unordered insert_many of 1,000 and nothing else (no broker, no bookkeeping).

Each run writes to a collection of its own, dropped afterwards, so every run sees the same store.
"""

import argparse
import logging
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.baseline import celery_chunks as chunks
from bench.baseline import celery_records as baseline
from bench.procs import Proc
from bench.stats import fmt_summary, summary
from bench.system import BenchContext, synthetic_job
from cairn_contracts.clock import parse_moment

logger = logging.getLogger(__name__)

NAME = "ingest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ingest (scenario 1)")
    group.add_argument("--records", type=int, default=40_000, help="records of the Cairn job (default 40,000; the issue's figure is 1,000,000)")
    group.add_argument("--record-size", type=int, default=1024, help="payload bytes per record (default 1024)")
    group.add_argument("--workers", type=_ints, default=[1, 2, 4], help="worker processes to measure (default 1,2,4)")
    group.add_argument("--shards", type=int, default=8, help="range shards of the Cairn job (default 8)")
    group.add_argument("--batch-size", type=int, default=1000, help="records per batch and checkpoint (default 1000)")
    group.add_argument("--baseline-records", type=int, default=2_500, help="records of a baseline run (default 2,500)")
    group.add_argument("--baseline-workers", type=_ints, default=None, help="worker processes of the baseline (default: --workers)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    cairn: dict[str, Any] = {}
    for workers in args.workers:
        worker = ctx.start_worker(workers)
        warm_up(ctx, url, workers, [worker, scheduler])
        runs = []
        for rep in range(args.repeats):
            runs.append(cairn_run(ctx, url, args, tag=f"w{workers}r{rep}", worker=worker, gateway=gateway, scheduler=scheduler))
            logger.info("ingest: cairn %d workers run %d: %.0f records/s", workers, rep + 1, runs[-1]["records_per_s"])
        ctx.stop(worker)
        cairn[str(workers)] = _summarise(runs)
    ctx.stop(gateway, scheduler)

    base: dict[str, Any] = {}
    baseline.app.conf.broker_url = ctx.amqp_url
    for workers in args.baseline_workers or args.workers:
        worker = start_baseline_worker(ctx, workers)
        baseline_run(ctx, args, tag=f"warm{workers}", worker=worker, records=max(50, 20 * workers))
        runs = []
        for rep in range(args.repeats):
            runs.append(baseline_run(ctx, args, tag=f"w{workers}r{rep}", worker=worker, records=args.baseline_records))
            logger.info("ingest: baseline %d workers run %d: %.0f records/s", workers, rep + 1, runs[-1]["records_per_s"])
        ctx.stop(worker)
        base[str(workers)] = _summarise(runs)
    ctx.purge(baseline.QUEUE)

    peer: dict[str, Any] = {}
    chunks.app.conf.broker_url = ctx.amqp_url
    for workers in args.baseline_workers or args.workers:
        worker = start_baseline_worker(ctx, workers, module="bench.baseline.celery_chunks", queue=chunks.QUEUE, name="chunks")
        chunk_run(ctx, args, tag=f"cwarm{workers}", worker=worker, records=2 * chunks.CHUNK * workers)
        runs = []
        for rep in range(args.repeats):
            runs.append(chunk_run(ctx, args, tag=f"cw{workers}r{rep}", worker=worker, records=args.records))
            logger.info("ingest: Celery-chunk peer %d workers run %d: %.0f records/s", workers, rep + 1, runs[-1]["records_per_s"])
        ctx.stop(worker)
        peer[str(workers)] = _summarise(runs)
    ctx.purge(chunks.QUEUE)

    limit_runs = []
    for rep in range(args.repeats):
        limit_runs.append(store_limit_run(ctx, args, tag=f"l{rep}"))
        logger.info("ingest: store insert_many limit (2 clients) run %d: %.0f records/s", rep + 1, limit_runs[-1]["records_per_s"])
    store_limit = _summarise(limit_runs)

    def ratios(other: dict[str, Any]) -> dict[str, float]:
        return {
            w: round(cairn[w]["records_per_s"]["median"] / other[w]["records_per_s"]["median"], 2)
            for w in cairn
            if w in other and other[w]["records_per_s"]["median"]
        }

    ratio = ratios(base)
    limit_median = store_limit["records_per_s"]["median"]
    return {
        "params": {
            "records": args.records,
            "record_size": args.record_size,
            "shards": args.shards,
            "batch_size": args.batch_size,
            "baseline_records": args.baseline_records,
            "repeats": args.repeats,
        },
        "cairn": cairn,
        "chunks": peer,
        "ratio_chunks": ratios(peer),
        "baseline": base,
        "ratio": ratio,
        "store_limit": store_limit,
        "ratio_store_limit": {w: round(c["records_per_s"]["median"] / limit_median, 2) for w, c in cairn.items()} if limit_median else {},
    }


def warm_up(ctx: BenchContext, url: str, workers: int, procs: list[Proc]) -> None:
    """A small job first, so every pool process has its connections before the clock runs."""
    body = synthetic_job(
        records=200 * workers, record_size=100, shards=workers, batch_size=100,
        key_prefix=f"warm{uuid.uuid4().hex[:12]}", collection="bench_warmup", name="bench warm-up",
    )
    job_id = ctx.submit(url, body)
    ctx.wait_job(job_id, timeout_s=120, procs=procs)
    ctx.drop("bench_warmup")


def cairn_run(ctx: BenchContext, url: str, args: argparse.Namespace, *, tag: str, worker: Proc, gateway: Proc, scheduler: Proc) -> dict[str, Any]:
    collection = f"bench_s1_{tag}"
    body = synthetic_job(
        records=args.records, record_size=args.record_size, shards=args.shards, batch_size=args.batch_size,
        key_prefix=f"s1{tag}", collection=collection, name="bench ingest",
    )
    ctx.settle()
    meter = ctx.cpu_meter(workers=worker, gateway=gateway, scheduler=scheduler).start()
    started, started_wall = time.monotonic(), time.time()
    job_id = ctx.submit(url, body)
    job, finished = ctx.wait_job(job_id, timeout_s=120 + args.records / 500, procs=[worker, scheduler])
    cpu = meter.stop()
    seconds = finished - started
    timeline = _timeline(ctx, job_id, started_wall, started_wall + seconds)
    stored = ctx.records_db[collection].count_documents({})
    ctx.drop(collection)
    if job["state"] != "SUCCESS" or stored != args.records:
        raise RuntimeError(f"ingest run {tag}: job {job['state']}, {stored} of {args.records} records stored")
    result = job.get("result") or {}
    return {
        "records": args.records,
        "seconds": round(seconds, 3),
        "records_per_s": args.records / seconds,
        "records_redone": result.get("records_redone"),
        "timeline": timeline,
        "cpu": cpu,
    }


def _timeline(ctx: BenchContext, job_id: str, posted: float, seen: float) -> dict[str, float | None]:
    """Fixed costs around the work: POST → first shard claimed, last shard done → SUCCESS seen."""
    shards = list(ctx.db["shards"].find({"job_id": job_id}, {"started_at": 1, "finished_at": 1}))
    starts = [t.timestamp() for t in (parse_moment(s.get("started_at")) for s in shards) if t]
    ends = [t.timestamp() for t in (parse_moment(s.get("finished_at")) for s in shards) if t]
    return {
        "to_first_claim_s": round(min(starts) - posted, 3) if starts else None,
        "last_shard_to_seen_s": round(seen - max(ends), 3) if ends else None,
    }


def start_baseline_worker(
    ctx: BenchContext, concurrency: int, module: str = "bench.baseline.celery_records", queue: str = baseline.QUEUE, name: str = "baseline"
) -> Proc:
    before = ctx.consumers(queue)
    proc = ctx.start(
        f"{name}-worker-{concurrency}",
        [
            sys.executable, "-m", "celery", "-A", module, "worker",
            "-Q", queue, f"--concurrency={concurrency}", "--loglevel=WARNING",
            "-n", f"bench-{name}-{concurrency}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ],
        ctx.service_env(BENCH_BASELINE_BROKER=ctx.amqp_url, BENCH_BASELINE_DATABASE=ctx.database),
    )
    ctx.wait_consumers(queue, before + 1, proc)
    ctx.wait_pool(proc, concurrency)
    return proc


def baseline_run(ctx: BenchContext, args: argparse.Namespace, *, tag: str, worker: Proc, records: int) -> dict[str, Any]:
    collection = f"bench_s1b_{tag}"
    job_id = f"baseline-{ctx.run_id}-{tag}"
    fill = baseline.filler(args.record_size)
    target = ctx.db[collection]
    ctx.settle()
    meter = ctx.cpu_meter(workers=worker).start()
    started = time.monotonic()
    for index in range(records):
        baseline.store_record.delay(baseline.make_record(f"s1b{tag}", index, fill), collection, job_id)
    published = time.monotonic()
    deadline = started + 120 + records / 50
    stored = 0
    while True:
        stored = target.estimated_document_count()  # count_documents({}) scans: 0.4 s at 20k records on the stand-in
        if stored >= records:
            break
        if time.monotonic() > deadline or not worker.alive():
            raise RuntimeError(f"baseline run {tag}: {stored} of {records} records stored:\n{worker.log_tail()}")
        time.sleep(0.05)
    finished = time.monotonic()
    cpu = meter.stop()
    ctx.drop(collection)
    seconds = finished - started
    return {
        "records": records,
        "seconds": round(seconds, 3),
        "records_per_s": records / seconds,
        "publish_s": round(published - started, 3),
        "cpu": cpu,
    }


def chunk_run(ctx: BenchContext, args: argparse.Namespace, *, tag: str, worker: Proc, records: int) -> dict[str, Any]:
    """The Celery-chunk peer: one task per 1,000 records, insert_many; until all are stored."""
    collection = f"bench_s1c_{tag}"
    job_id = f"chunks-{ctx.run_id}-{tag}"
    target = ctx.db[collection]
    ctx.settle()
    meter = ctx.cpu_meter(workers=worker).start()
    started = time.monotonic()
    for first in range(0, records, chunks.CHUNK):
        chunks.store_chunk.delay(f"s1c{tag}", first, min(records, first + chunks.CHUNK), args.record_size, collection, job_id)
    published = time.monotonic()
    deadline = started + 120 + records / 200
    while (stored := target.estimated_document_count()) < records:  # not count_documents: it scans, loading the store
        if time.monotonic() > deadline or not worker.alive():
            raise RuntimeError(f"chunk peer run {tag}: {stored} of {records} records stored:\n{worker.log_tail()}")
        time.sleep(0.05)
    finished = time.monotonic()
    cpu = meter.stop()
    ctx.drop(collection)
    seconds = finished - started
    return {"records": records, "seconds": round(seconds, 3), "records_per_s": records / seconds, "publish_s": round(published - started, 3), "cpu": cpu}


def store_limit_run(ctx: BenchContext, args: argparse.Namespace, *, tag: str, clients: int = 2) -> dict[str, Any]:
    """Two client processes insert_many the records (halves of the range), nothing else."""
    collection = f"bench_s1l_{tag}"
    ctx.settle()
    bounds = [(args.records * i // clients, args.records * (i + 1) // clients) for i in range(clients)]
    meter = ctx.cpu_meter().start()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.baseline.store_limit", ctx.mongodb_uri, ctx.database, collection, f"s1l{tag}",
             str(lo), str(hi), str(args.record_size)],
            env=ctx.service_env(), stdout=subprocess.PIPE, text=True,
        )
        for lo, hi in bounds
    ]
    outputs = [p.communicate(timeout=120 + args.records / 200)[0] for p in procs]
    finished = time.monotonic()
    cpu = meter.stop()
    stored = ctx.db[collection].count_documents({})
    ctx.drop(collection)
    if any(p.returncode for p in procs) or stored != args.records:
        raise RuntimeError(f"store limit run {tag}: {stored} of {args.records} stored ({outputs})")
    seconds = finished - started
    return {"records": args.records, "seconds": round(seconds, 3), "records_per_s": args.records / seconds, "cpu": cpu}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def share(run: dict[str, Any], key: str) -> float:
        return 100 * run["cpu"].get(key, 0.0) / run["cpu"]["wall"] if run["cpu"]["wall"] else 0.0

    return {
        "runs": runs,
        "records_per_s": summary([r["records_per_s"] for r in runs]),
        "seconds": summary([r["seconds"] for r in runs]),
        "to_first_claim_s": summary([r["timeline"]["to_first_claim_s"] for r in runs if r.get("timeline", {}).get("to_first_claim_s") is not None]),
        "last_shard_to_seen_s": summary([r["timeline"]["last_shard_to_seen_s"] for r in runs if r.get("timeline", {}).get("last_shard_to_seen_s") is not None]),
        "stand_in_busy_pct": summary([share(r, "stand_in") for r in runs]) if runs and "stand_in" in runs[0]["cpu"] else None,
        "cpu_cores": {
            key: round(sum(r["cpu"].get(key, 0.0) for r in runs) / sum(r["cpu"]["wall"] for r in runs), 2)
            for key in ("stand_in", "mongodb", "workers", "rabbitmq", "gateway", "scheduler", "bench", "other", "machine_busy")
            if runs and key in runs[0]["cpu"]
        },
    }


# --- reporting ---------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["workers", "Cairn records/s", "Celery-chunk peer", "ratio", "one task per record", "ratio", "store limit (2 clients)", "ratio", "stand-in CPU (Cairn)"]
    rows = []
    peer = result.get("chunks", {})
    limit = result.get("store_limit")
    for w, cairn in result["cairn"].items():
        base = result["baseline"].get(w)
        busy = cairn.get("stand_in_busy_pct")
        rows.append([
            w,
            fmt_summary(cairn["records_per_s"]),
            fmt_summary(peer[w]["records_per_s"]) if w in peer else "-",
            f"{result['ratio_chunks'][w]}×" if w in result.get("ratio_chunks", {}) else "-",
            fmt_summary(base["records_per_s"]) if base else "-",
            f"{result['ratio'][w]}×" if w in result["ratio"] else "-",
            fmt_summary(limit["records_per_s"]) if limit else "-",
            f"{result['ratio_store_limit'][w]}×" if w in result.get("ratio_store_limit", {}) else "-",
            fmt_summary(busy, "%") if busy else "-",
        ])
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    two = result["cairn"].get("2")
    return {
        "cairn_2_workers_records_per_s": two["records_per_s"]["median"] if two else None,
        "chunks_2_workers_records_per_s": result.get("chunks", {}).get("2", {}).get("records_per_s", {}).get("median"),
        "ratio_chunks_2_workers": result.get("ratio_chunks", {}).get("2"),
        "baseline_2_workers_records_per_s": result["baseline"].get("2", {}).get("records_per_s", {}).get("median"),
        "ratio_2_workers": result["ratio"].get("2"),
        "store_limit_records_per_s": (result.get("store_limit") or {}).get("records_per_s", {}).get("median"),
        "ratio_store_limit_2_workers": result.get("ratio_store_limit", {}).get("2"),
    }
