"""Scenario: per-shard cost. The same synthetic job cut into 8 / 256 / 1,024 range shards and
into 4,096 lease-frontier items, with `GET /task/status` latency measured while each one runs.

Cairn: one gateway, one scheduler, one ingest worker of `--scaling-workers` prefork processes
(CAIRN_WORKER_CONCURRENCY); the clock runs from the POST until the bench sees SUCCESS in MongoDB.
Meanwhile one client thread calls `GET /task/status` back to back (closed loop) and records each
answer's latency: the p50/p99 of a running job of that many shards. Also reported: how long after
the POST the last shard was queued (range shards: the scheduler's dispatch), and the time of each
plan relative to the 8-shard one (the issue's goal: 1,024 shards within 1.3x, 4,096 items 1.5x).
"""

import argparse
import logging
import threading
import time
from typing import Any

import httpx

from bench import counted
from bench.stats import fmt_summary, summary
from bench.system import BenchContext, synthetic_job
from cairn_contracts.clock import stored_ms

logger = logging.getLogger(__name__)

NAME = "scaling"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scaling (per-shard cost)")
    group.add_argument("--scaling-records", type=int, default=65_536, help="records of every job (default 65,536)")
    group.add_argument("--scaling-record-size", type=int, default=1024, help="payload bytes per record (default 1024)")
    group.add_argument("--scaling-plans", default="range:8,range:256,range:1024,lease_frontier:4096",
                       help="strategy:count, comma-separated (lease_frontier counts are work items)")
    group.add_argument("--scaling-workers", type=int, default=2, help="worker processes (default 2)")
    group.add_argument("--scaling-batch-size", type=int, default=1000, help="records per batch (default 1000)")
    group.add_argument("--scaling-repeats", type=int, default=1, help="runs per plan (default 1: the large plans are slow on the stand-in)")
    group.add_argument("--scaling-count", action=argparse.BooleanOptionalAction, default=True,
                       help="run the services through bench.counted: MongoDB commands, publishes and tasks per shard (default on)")
    group.add_argument("--scaling-idle-shards", type=int, default=2048,
                       help="shards of the running job whose status is timed with no other load (0: skip)")


def plans(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        strategy, _, count = part.strip().partition(":")
        out.append((strategy, int(count)))
    return out


def job_body(args: argparse.Namespace, strategy: str, count: int, tag: str, collection: str) -> dict[str, Any]:
    body = synthetic_job(
        records=args.scaling_records, record_size=args.scaling_record_size, shards=count,
        batch_size=args.scaling_batch_size, key_prefix=f"sc{tag}", collection=collection, name=f"bench scaling {strategy} {count}",
    )
    if strategy == "lease_frontier":
        item_size = -(-args.scaling_records // count)
        body["sharding"] = {"strategy": "lease_frontier", "shards": args.scaling_workers, "item_size": item_size}
    return body


class StatusProbe:
    """Calls GET /task/status?task_id=... back to back in a thread; keeps every latency (ms)."""

    def __init__(self, url: str, headers: dict[str, str], job_id: str) -> None:
        self._url = f"{url}/task/status/{job_id}"
        self._headers = headers
        self._job_id = job_id
        self._stop = threading.Event()
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="status-probe", daemon=True)

    def __enter__(self) -> "StatusProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30, headers=self._headers) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.get(self._url)
                    if response.status_code == 200:
                        self.latencies_ms.append((time.perf_counter() - started) * 1000)
                        if response.json().get("state") in ("SUCCESS", "FAILURE"):
                            return  # finished: later answers come from the cache, not the running job
                    else:
                        self.errors += 1
                except httpx.HTTPError:
                    self.errors += 1
                time.sleep(0.02)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def scaling_run(ctx: BenchContext, url: str, args: argparse.Namespace, strategy: str, count: int, tag: str, procs: list[Any]) -> dict[str, Any]:
    collection = f"bench_sc_{tag}"
    body = job_body(args, strategy, count, tag, collection)
    ctx.settle()
    counts_before = _read_counts(ctx)
    # Per service: which process a shard's CPU goes to (procs: worker, scheduler, gateway).
    meter = ctx.cpu_meter(**dict(zip(("worker", "scheduler", "gateway"), procs, strict=True))).start()
    started, posted_ms = time.monotonic(), int(time.time() * 1000)
    job_id = ctx.submit(url, body)
    with StatusProbe(url, ctx.api_headers(), job_id) as probe:
        job, finished = ctx.wait_job(job_id, timeout_s=900, procs=procs)
    seconds = finished - started
    cpu = meter.stop()
    cpu["cairn"] = round(sum(cpu.get(name, 0.0) for name in ("worker", "scheduler", "gateway")), 3)
    counts = _counts_since(ctx, counts_before, count)
    queued = [s.get("queued_at_ms") for s in ctx.db["shards"].find({"job_id": job_id}, {"queued_at_ms": 1})]
    queued_ms = [q for q in queued if isinstance(q, int)]
    stored = ctx.records_db[collection].count_documents({})
    ctx.drop(collection)
    if job["state"] != "SUCCESS" or stored != args.scaling_records:
        raise RuntimeError(f"scaling run {tag}: job {job['state']}, {stored} of {args.scaling_records} records stored")
    result = job.get("result") or {}
    return {
        "seconds": round(seconds, 3),
        "records_per_s": args.scaling_records / seconds,
        "all_queued_s": round((max(queued_ms) - posted_ms) / 1000, 3) if queued_ms and strategy != "lease_frontier" else None,
        "status_calls": len(probe.latencies_ms),
        "status_errors": probe.errors,
        "status_p50_ms": percentile(probe.latencies_ms, 0.5),
        "status_p99_ms": percentile(probe.latencies_ms, 0.99),
        "status_max_ms": max(probe.latencies_ms) if probe.latencies_ms else None,
        "records_done": result.get("records_done"),
        "cpu": cpu,
        "other_cores": round(cpu.get("other", 0.0) / cpu["wall"], 2) if cpu.get("wall") else None,
        "finished_at_ms": stored_ms(job.get("finished_at")),
        **({"counts": counts} if counts else {}),
    }


def _read_counts(ctx: BenchContext) -> dict[str, Any] | None:
    if ctx.counts_dir is None:
        return None
    time.sleep(2 * counted._DUMP_EVERY_S + 0.2)  # every process has written what it did before
    return counted.read_counts(ctx.counts_dir)


def _counts_since(ctx: BenchContext, before: dict[str, Any] | None, shards: int) -> dict[str, Any] | None:
    """What each service did for the job (while it ran and until its SUCCESS was seen), in total
    and per shard (lease frontier: per work item)."""
    if before is None:
        return None
    after = _read_counts(ctx)
    assert after is not None
    spent = counted.difference(after, before)
    per_shard: dict[str, Any] = {}
    for service, c in sorted(spent.items()):
        per_shard[service] = {
            "mongo": round(sum(n for n, _ in c["mongo"].values()) / shards, 2),
            "mongo_s": round(sum(t for _, t in c["mongo"].values()) / shards * 1000, 2),  # ms of client-side latency
            "publishes": round(sum(c["publish"].values()) / shards, 2),
            "tasks": round(sum(c["tasks"].values()) / shards, 2),
        }
    return {"per_shard": per_shard, "total": spent}


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    if args.scaling_count:
        ctx.counts_dir = ctx.out_dir / "counts"
        ctx.counts_dir.mkdir(parents=True, exist_ok=True)
    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    worker = ctx.start_worker(args.scaling_workers)
    procs = [worker, scheduler, gateway]
    warm = job_body(args, "range", args.scaling_workers, f"warm{ctx.run_id}", "bench_sc_warm")
    warm["params"]["count"] = 2000
    ctx.wait_job(ctx.submit(url, warm), timeout_s=120, procs=procs)
    ctx.drop("bench_sc_warm")
    out: dict[str, Any] = {}
    for strategy, count in plans(args.scaling_plans):
        runs = []
        for rep in range(args.scaling_repeats):
            tag = f"{strategy[:2]}{count}r{rep}"
            runs.append(scaling_run(ctx, url, args, strategy, count, tag, procs))
            r = runs[-1]
            logger.info(
                "scaling: %s %d: %.1f s, status p50 %s ms p99 %s ms (%d calls), all queued after %s s; per shard: %s",
                strategy, count, r["seconds"], _ms(r["status_p50_ms"]), _ms(r["status_p99_ms"]), r["status_calls"], r["all_queued_s"],
                (r.get("counts") or {}).get("per_shard"),
            )
        out[f"{strategy}:{count}"] = {
            "strategy": strategy,
            "count": count,
            "runs": runs,
            "seconds": summary([r["seconds"] for r in runs]),
            "status_p50_ms": summary([r["status_p50_ms"] for r in runs if r["status_p50_ms"] is not None]),
            "status_p99_ms": summary([r["status_p99_ms"] for r in runs if r["status_p99_ms"] is not None]),
            "all_queued_s": summary([r["all_queued_s"] for r in runs if r["all_queued_s"] is not None]),
        }
    ctx.stop(worker, scheduler)
    ctx.counts_dir = None
    idle = idle_status(ctx, url, args.scaling_idle_shards) if args.scaling_idle_shards else None
    ctx.stop(gateway)
    base = next(iter(out.values()))["seconds"]["median"] if out else None
    for entry in out.values():
        entry["time_ratio"] = round(entry["seconds"]["median"] / base, 2) if base else None
    return {
        "params": {
            "records": args.scaling_records, "record_size": args.scaling_record_size, "workers": args.scaling_workers,
            "batch_size": args.scaling_batch_size, "repeats": args.scaling_repeats,
        },
        "plans": out,
        "idle_status": idle,
    }


def idle_status(ctx: BenchContext, url: str, shards: int, calls: int = 100) -> dict[str, Any]:
    """`GET /task/status` of a running job of `shards` shards with nothing else running: the job,
    its shards and checkpoints recorded as a running job leaves them (half ended), no worker or
    scheduler; `calls` sequential requests."""
    from cairn_contracts.store import JOB_TALLIES, JobRecord, ShardRecord
    from cairn_runtime import tally

    spec = {"pipeline": "synthetic", "params": {"count": shards * 10}, "sharding": {"strategy": "lease_frontier", "shards": 2, "item_size": 10}}
    record = JobRecord.new(spec, "default", now=None)
    half = shards // 2
    ctx.db["jobs"].insert_one(record.to_document() | {
        "state": "STARTED", "shard_count": shards, "records_total": shards * 10, "weight_total": shards * 10,
        "counts": {"shards_succeeded": half, "records_done": half * 10, "weight_done": half * 10, "batches": half},
        "shard_states": {"SUCCEEDED": half, "PLANNED": shards - half},
    })
    ledger = tally.empty_buckets(record.id, [f"{record.id}:{i:04d}" for i in range(shards)])
    for bucket in ledger:  # the ledger of the ended half, beside the job (cairn_runtime/tally.py)
        first = bucket["bucket"] * tally.BUCKET_SHARDS
        bucket["entries"] = {f"s{i:04d}": "SUCCEEDED|10|10|0|1|10" for i in range(first, min(half, first + tally.BUCKET_SHARDS))}
    ctx.db[JOB_TALLIES].insert_many(ledger)
    docs = [
        ShardRecord(shard_key=f"{record.id}:{i:04d}", job_id=record.id, index=i, strategy="lease_frontier", range_start=i * 10,
                    range_end=i * 10 + 10, records_estimate=10, priority=2, state="SUCCEEDED" if i < half else "PLANNED")
        for i in range(shards)
    ]
    ctx.db["shards"].insert_many([d.to_document() for d in docs])
    ctx.db["checkpoints"].insert_many([d.checkpoint().to_document() | ({"cursor": d.range_end, "records_done": 10} if d.index < half else {}) for d in docs])
    ctx.settle()
    latencies = []
    with httpx.Client(timeout=60, headers=ctx.api_headers()) as client:
        for _ in range(calls):
            started = time.perf_counter()
            response = client.get(f"{url}/task/status/{record.id}")
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"status of the idle job answered {response.status_code}: {response.text[:300]}")
    return {"shards": shards, "calls": calls, "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies)}


def _ms(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["plan", "seconds", "× the first", "records/s", "status p50", "status p99", "all queued after", "other programs (cores)"]
    rows = []
    for name, entry in result["plans"].items():
        rows.append([
            name,
            fmt_summary(entry["seconds"], " s"),
            f"{entry['time_ratio']}×" if entry.get("time_ratio") is not None else "-",
            f"{result['params']['records'] / entry['seconds']['median']:,.0f}",
            fmt_summary(entry["status_p50_ms"], " ms") if entry["status_p50_ms"] else "-",
            fmt_summary(entry["status_p99_ms"], " ms") if entry["status_p99_ms"] else "-",
            fmt_summary(entry["all_queued_s"], " s", 1) if entry["all_queued_s"] else "-",
            ", ".join(f"{r['other_cores']:.1f}" for r in entry["runs"] if r.get("other_cores") is not None) or "-",
        ])
    return headers, rows


def counts_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Per shard (lease frontier: per item) and service: MongoDB commands, AMQP publishes, Celery
    task deliveries (median run's counts; None when the run was not counted)."""
    headers = ["plan", "service", "MongoDB commands", "publishes", "Celery tasks", "commands by kind (≥ 0.05 per shard)"]
    rows = []
    for name, entry in result["plans"].items():
        counts = next((r["counts"] for r in entry["runs"] if r.get("counts")), None)
        if counts is None:
            continue
        shards = entry["count"]
        for service in ("ingest_worker", "scheduler", "gateway"):
            per = counts["per_shard"].get(service)
            if per is None:
                continue
            kinds = sorted(counts["total"][service]["mongo"].items(), key=lambda kv: -kv[1][0])
            shown = ", ".join(f"{key} {n / shards:.2f}" for key, (n, _) in kinds if n / shards >= 0.05)
            rows.append([name, service, f"{per['mongo']:.2f}", f"{per['publishes']:.2f}", f"{per['tasks']:.2f}", shown])
    return (headers, rows) if rows else None


def idle_line(result: dict[str, Any]) -> str | None:
    idle = result.get("idle_status")
    if not idle:
        return None
    return (f"`GET /task/status` of a running {idle['shards']:,}-shard job with no other load ({idle['calls']} calls): "
            f"p50 {idle['p50_ms']:.1f} ms, p99 {idle['p99_ms']:.1f} ms")


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {name: {"time_ratio": e.get("time_ratio"), "status_p99_ms": (e["status_p99_ms"] or {}).get("median")} for name, e in result["plans"].items()}
