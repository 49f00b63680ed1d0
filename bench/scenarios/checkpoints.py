"""Scenario 2: what checkpointing every batch costs, across batch sizes.

The same synthetic job as scenario 1 (one worker of `--checkpoint-workers` processes, one range
shard per process) runs with checkpoints on (production) and off (the benchmark-only worker
`python -m bench.uncheckpointed_worker`: only a shard's last batch writes its checkpoint), at
every batch size. On and off alternate within each repeat, with a fresh worker each time, so a
drift of the machine (another program, a growing store) cannot pass for overhead.

Dedup has no off switch: it is the unique `_id` of every record (an index every MongoDB collection
has), which the same insert_many pays in both modes; the cost of a *redone* batch is shown by
scenario 4 (records redone) instead.

Overhead = (median time with checkpoints / median time without) - 1, and the same in the MongoDB
server's CPU time (what the checkpoint writes cost the store; far less sensitive to other programs
on the machine). The recommended batch size is the smallest whose store cost per record is within
5% of the best measured and whose overhead is under 10%: smaller batches redo less after a crash
and hold less in memory.
"""

import argparse
import logging
import time
from typing import Any

from bench.procs import Proc
from bench.scenarios.ingest import _ints, warm_up
from bench.stats import fmt_summary, summary
from bench.system import BenchContext, synthetic_job

logger = logging.getLogger(__name__)

NAME = "checkpoints"
DEFAULT_BATCH_SIZE = 1000  # the contracts' JobSpec default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (scenario 2)")
    group.add_argument("--checkpoint-records", type=int, default=24_000, help="records of each job (default 24,000)")
    group.add_argument("--batch-sizes", type=_ints, default=[100, 300, 1000, 3000, 10000], help="batch sizes to measure")
    group.add_argument("--checkpoint-workers", type=int, default=2, help="worker processes (and shards) (default 2)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {str(b): {"on": [], "off": []} for b in args.batch_sizes}
    for rep in range(args.repeats):
        for mode in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            module = "bench.uncheckpointed_worker" if mode == "off" else "cairn_ingest_worker.main"
            worker = ctx.start_worker(args.checkpoint_workers, name=f"worker-checkpoints-{mode}", module=module)
            warm_up(ctx, url, args.checkpoint_workers, [worker, scheduler])
            for batch_size in args.batch_sizes:
                run_ = _run(ctx, url, args, batch_size, tag=f"b{batch_size}{mode}r{rep}", worker=worker, scheduler=scheduler)
                runs[str(batch_size)][mode].append(run_)
                logger.info("checkpoints: batch %d, checkpoints %s, run %d: %.0f records/s", batch_size, mode, rep + 1, run_["records_per_s"])
            ctx.stop(worker)
    ctx.stop(gateway, scheduler)

    sizes: dict[str, Any] = {}
    for size, modes in runs.items():
        on = summary([r["seconds"] for r in modes["on"]])
        off = summary([r["seconds"] for r in modes["off"]])
        sizes[size] = {
            "on": {"seconds": on, "records_per_s": summary([r["records_per_s"] for r in modes["on"]]), "runs": modes["on"],
                   "stand_in_cpu_s": summary([r["cpu"].get("stand_in", 0.0) for r in modes["on"]])},
            "off": {"seconds": off, "records_per_s": summary([r["records_per_s"] for r in modes["off"]]), "runs": modes["off"],
                    "stand_in_cpu_s": summary([r["cpu"].get("stand_in", 0.0) for r in modes["off"]])},
            "overhead_pct": round((on["median"] / off["median"] - 1) * 100, 1),
            "checkpoint_writes": args.checkpoint_records // int(size),
        }
    recommended = recommend(sizes, args.checkpoint_records)
    return {
        "params": {
            "records": args.checkpoint_records,
            "record_size": args.record_size,
            "workers": args.checkpoint_workers,
            "shards": args.checkpoint_workers,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
        },
        "sizes": sizes,
        "recommended_batch_size": recommended,
        "default_batch_size": DEFAULT_BATCH_SIZE,
        "default_overhead_pct": sizes.get(str(DEFAULT_BATCH_SIZE), {}).get("overhead_pct"),
    }


def _run(ctx: BenchContext, url: str, args: argparse.Namespace, batch_size: int, *, tag: str, worker: Proc, scheduler: Proc) -> dict[str, Any]:
    collection = f"bench_s2_{tag}"
    body = synthetic_job(
        records=args.checkpoint_records, record_size=args.record_size, shards=args.checkpoint_workers,
        batch_size=batch_size, key_prefix=f"s2{tag}", collection=collection, name="bench checkpoints",
    )
    ctx.settle()
    meter = ctx.cpu_meter(workers=worker, scheduler=scheduler).start()
    started = time.monotonic()
    job_id = ctx.submit(url, body)
    job, finished = ctx.wait_job(job_id, timeout_s=120 + args.checkpoint_records / 500, procs=[worker, scheduler])
    cpu = meter.stop()
    stored = ctx.records_db[collection].count_documents({})
    checkpoints = list(ctx.db["checkpoints"].find({"job_id": job_id}, {"records_done": 1, "batches": 1}))
    ctx.drop(collection)
    if job["state"] != "SUCCESS" or stored != args.checkpoint_records:
        raise RuntimeError(f"checkpoint run {tag}: job {job['state']}, {stored} of {args.checkpoint_records} records stored")
    seconds = finished - started
    return {
        "seconds": round(seconds, 3),
        "records_per_s": args.checkpoint_records / seconds,
        "records_done": sum(int(c.get("records_done", 0)) for c in checkpoints),
        "checkpoint_writes": sum(int(c.get("batches", 0)) for c in checkpoints),
        "cpu": cpu,
    }


def recommend(sizes: dict[str, Any], records: int) -> int | None:
    """The smallest batch size within 5% of the best and with checkpoint overhead under 10%.

    Judged on the MongoDB server's CPU per record and the store-CPU overhead when the server is
    local (robust to other programs sharing the machine), else on wall-clock throughput.
    """
    if all(store_overhead_pct(s) is not None for s in sizes.values()):
        cost = {int(k): s["on"]["stand_in_cpu_s"]["median"] / records for k, s in sizes.items()}
        best = min(cost.values())
        eligible = [k for k, s in sizes.items() if cost[int(k)] <= 1.05 * best and (store_overhead_pct(s) or 0) < 10]
    else:
        top = max(s["on"]["records_per_s"]["median"] for s in sizes.values())
        eligible = [k for k, s in sizes.items() if s["on"]["records_per_s"]["median"] >= 0.95 * top and s["overhead_pct"] < 10]
    return min(int(k) for k in eligible) if eligible else None


def store_overhead_pct(size: dict[str, Any]) -> float | None:
    """Overhead in the MongoDB server's CPU time (on / off - 1): what the checkpoint writes cost the
    store itself, much less sensitive than wall time to other programs sharing the machine."""
    on, off = size["on"].get("stand_in_cpu_s") or {}, size["off"].get("stand_in_cpu_s") or {}
    if not on.get("median") or not off.get("median"):
        return None
    return round((on["median"] / off["median"] - 1) * 100, 1)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["batch size", "with checkpoints rec/s", "without rec/s", "overhead (time)", "overhead (store CPU)", "checkpoint writes"]
    rows = []
    for size, s in result["sizes"].items():
        mark = " (default)" if int(size) == result["default_batch_size"] else ""
        mark += " ← recommended" if int(size) == result["recommended_batch_size"] else ""
        store = store_overhead_pct(s)
        rows.append([
            f"{int(size):,}{mark}",
            fmt_summary(s["on"]["records_per_s"]),
            fmt_summary(s["off"]["records_per_s"]),
            f"{s['overhead_pct']:+.1f}%",
            f"{store:+.1f}%" if store is not None else "-",
            f"{s['checkpoint_writes']:,}",
        ])
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "overhead_pct_at_default": result["default_overhead_pct"],
        "default_batch_size": result["default_batch_size"],
        "recommended_batch_size": result["recommended_batch_size"],
    }
