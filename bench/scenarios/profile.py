"""The hot path of scenario 1, profiled: where a worker's time goes, and how much is MongoDB's.

One ingest worker process (`bench/profile_worker.py`: the production Celery app with the solo
pool, under pyinstrument, with a pymongo CommandListener) runs the scenario-1 job with
`--profile-records` records. Reported: records/s of the one process, the time of every MongoDB
command by name (the stand-in's share of the hot path), and the profiled time by code area.
The full profile is kept as profile.html / profile.txt in the results directory.
"""

import argparse
import json
import logging
import sys
import time
from typing import Any

from bench.profiles.checkpoint_filter_ab import run_ab
from bench.scenarios.ingest import warm_up
from bench.system import QUEUE_INGEST, BenchContext, synthetic_job

logger = logging.getLogger(__name__)

NAME = "profile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("profile (hot path of scenario 1)")
    group.add_argument("--profile-records", type=int, default=30_000, help="records of the profiled job (default 30,000)")
    group.add_argument("--profile-history", type=int, default=2_000,
                       help="finished shards (and their checkpoints) already in the store, as after 250 jobs of 8 shards (default 2,000)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    out = ctx.out_dir / "profile"
    add_history(ctx, args.profile_history)
    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    before = ctx.consumers(QUEUE_INGEST)
    worker = ctx.start(
        "worker-profiled",
        [sys.executable, "-m", "bench.profile_worker"],
        ctx.service_env(BENCH_PROFILE_DIR=out, BENCH_PROFILE_SKIP_TASKS=1, CAIRN_WORKER_CONCURRENCY=1),
    )
    ctx.wait_consumers(QUEUE_INGEST, before + 1, worker)
    warm_up(ctx, url, 1, [worker, scheduler])
    records = args.profile_records
    collection = "bench_profile"
    body = synthetic_job(
        records=records, record_size=args.record_size, shards=1, batch_size=args.batch_size,
        key_prefix=f"prof{ctx.run_id}", collection=collection, name="bench profile",
    )
    ctx.settle()
    meter = ctx.cpu_meter(workers=worker, scheduler=scheduler, gateway=gateway).start()
    started = time.monotonic()
    job_id = ctx.submit(url, body)
    job, finished = ctx.wait_job(job_id, timeout_s=120 + records / 300, procs=[worker, scheduler])
    cpu = meter.stop()
    stored = ctx.records_db[collection].count_documents({})
    ctx.drop(collection)
    ctx.stop(worker, gateway, scheduler)
    if job["state"] != "SUCCESS" or stored != records:
        raise RuntimeError(f"profile run: job {job['state']}, {stored} of {records} records stored")
    deadline = time.monotonic() + 30
    while not (out / "profile.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    # The hot-path change, A/B in the same conditions: the per-batch checkpoint write matched by
    # (shard_key, sub_key) as before, and by _id as now, alternating (bench/profiles/checkpoint_filter_ab.py).
    ctx.settle()
    ab = run_ab(ctx.mongodb_uri, history=args.profile_history, repeats=max(3, args.repeats))
    mongo = json.loads((out / "mongo_commands.json").read_text())
    profile = json.loads((out / "profile.json").read_text())
    task_s = mongo["task_seconds"]
    mongo_s = sum(c["seconds"] for c in mongo["commands"].values())
    text = (out / "profile.txt").read_text()
    return {
        "params": {"records": records, "record_size": args.record_size, "batch_size": args.batch_size, "pool": "solo (1 process)",
                   "history_shards": args.profile_history},
        "seconds": round(finished - started, 3),
        "records_per_s": records / (finished - started),
        "task_seconds": task_s,
        "mongo_seconds": round(mongo_s, 3),
        "mongo_share_pct": round(100 * mongo_s / task_s, 1) if task_s else None,
        "mongo_commands": mongo["commands"],
        "areas": profile["areas"],
        "profile_duration_s": profile["duration_s"],
        "profile_excerpt": "\n".join(text.splitlines()[:60]),
        "files": {"html": str(out / "profile.html"), "text": str(out / "profile.txt")},
        "cpu": cpu,
        "checkpoint_filter_ab": ab,
    }


def add_history(ctx: BenchContext, shards: int) -> None:
    """Finished shards and checkpoints of earlier jobs: a store with a past, as in any deployment."""
    for start in range(0, shards, 1000):
        keys = [(f"hist{ctx.run_id}{i // 8:05d}", f"hist{ctx.run_id}{i // 8:05d}:{i % 8:04d}", i % 8) for i in range(start, min(shards, start + 1000))]
        ctx.db["shards"].insert_many([
            {"_id": key, "shard_key": key, "job_id": job, "index": index, "strategy": "range", "range_start": index * 1000,
             "range_end": (index + 1) * 1000, "records_total": 1000, "priority": 2, "state": "SUCCEEDED", "attempts": 1,
             "fencing_token": 1, "lease_until": None, "taken_by": None}
            for job, key, index in keys
        ])
        ctx.db["checkpoints"].insert_many([
            {"_id": f"{key}/main", "shard_key": key, "sub_key": "main", "job_id": job, "cursor": (index + 1) * 1000,
             "range_start": index * 1000, "range_end": (index + 1) * 1000, "records_done": 1000, "records_written": 1000,
             "records_redone": 0, "batches": 1, "fencing_token": 1}
            for job, key, index in keys
        ])


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["measure", "value"]
    rows = [
        ["records/s (1 process, solo pool)", f"{result['records_per_s']:,.0f}"],
        ["time in tasks", f"{result['task_seconds']:.2f} s"],
        ["of which in MongoDB commands", f"{result['mongo_seconds']:.2f} s ({result['mongo_share_pct']}%)"],
    ]
    for name, c in sorted(result["mongo_commands"].items(), key=lambda kv: -kv[1]["seconds"])[:5]:
        rows.append([f"  {name}", f"{c['count']:,} calls, {c['seconds']:.2f} s"])
    total = sum(result["areas"].values()) or 1
    for area, seconds in list(result["areas"].items())[:6]:
        rows.append([f"profile: {area}", f"{seconds:.2f} s ({100 * seconds / total:.0f}%)"])
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {"records_per_s": result["records_per_s"], "mongo_share_pct": result["mongo_share_pct"]}
