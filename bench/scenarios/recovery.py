"""Scenario 4: recovery, from SIGKILL of a worker mid-shard to the shard progressing elsewhere.

Ingest workers (one process each, CAIRN_WORKER_ID bench-a, bench-b, ...: one per repeat plus
one) run with the lease settings under test (CAIRN_LEASE_TTL_S, CAIRN_HEARTBEAT_INTERVAL_S), next to the bench's gateway
and scheduler (default settings, as `make up` runs it). A one-shard synthetic job whose batches
take a while (`--recovery-delay-ms` per record) starts; once a few batches are checkpointed, the
worker holding the lease is SIGKILLed with its whole process group. The bench then polls the
shard and its checkpoint every 20 ms:

- takeover: the shard's fencing token moved past the dead worker's (someone claimed it);
- progress: the checkpoint moved past where the dead worker left it, under the new token;
- records redone: the checkpoint's `records_redone` at that moment (records of the batch in
  flight that were already stored; at most one batch).

After each run the job's documents are deleted (so no later reaping or retry touches the next
run); the next run uses the workers still alive.
"""

import argparse
import logging
import time
from typing import Any

from bench.procs import Proc
from bench.stats import fmt_summary, summary
from bench.system import QUEUE_INGEST, BenchContext, synthetic_job

logger = logging.getLogger(__name__)

NAME = "recovery"


def _leases(text: str) -> list[tuple[float, float]]:
    pairs = []
    for item in text.split(","):
        ttl, heartbeat = item.split(":")
        pairs.append((float(ttl), float(heartbeat)))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recovery (scenario 4)")
    group.add_argument("--leases", type=_leases, default=[(2.0, 0.5), (5.0, 1.0), (10.0, 2.0)],
                       help="lease TTL:heartbeat interval pairs in seconds (default 2:0.5,5:1,10:2; production is 30:5)")
    group.add_argument("--recovery-batch", type=int, default=500, help="batch size of the recovery job (default 500)")
    group.add_argument("--recovery-delay-ms", type=float, default=0.5, help="simulated work per record in ms (default 0.5)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    gateway, url = ctx.start_gateway()
    scheduler = ctx.start_scheduler()
    settings: dict[str, Any] = {}
    try:
        for ttl, heartbeat in args.leases:
            env = {"CAIRN_LEASE_TTL_S": ttl, "CAIRN_HEARTBEAT_INTERVAL_S": heartbeat}
            # One worker per kill and one to survive the last, all started at once (a worker
            # starts in seconds; restarting the killed one before each run would double the time).
            workers = ctx.start_workers([chr(ord("a") + i) for i in range(args.repeats + 1)], 1, **env)
            runs = []
            for rep in range(args.repeats):
                figures, killed = _run(ctx, url, args, ttl, workers, scheduler, tag=f"t{ttl:g}r{rep}")
                runs.append(figures)
                del workers[killed]
                logger.info(
                    "recovery: TTL %.1f s / heartbeat %.1f s, run %d: progress again after %.2f s, %d records redone",
                    ttl, heartbeat, rep + 1, figures["progress_s"], figures["records_redone"],
                )
            ctx.stop(*workers.values())
            ctx.purge(QUEUE_INGEST)
            settings[f"{ttl:g}:{heartbeat:g}"] = {
                "ttl_s": ttl,
                "heartbeat_s": heartbeat,
                "takeover_s": summary([r["takeover_s"] for r in runs]),
                "progress_s": summary([r["progress_s"] for r in runs]),
                "records_redone": summary([r["records_redone"] for r in runs]),
                "runs": runs,
            }
    finally:
        ctx.stop(gateway, scheduler)
    return {
        "params": {"batch_size": args.recovery_batch, "delay_ms_per_record": args.recovery_delay_ms, "repeats": args.repeats},
        "settings": settings,
    }


def _run(
    ctx: BenchContext, url: str, args: argparse.Namespace, ttl: float, workers: dict[str, Proc], scheduler: Proc, *, tag: str
) -> tuple[dict[str, Any], str]:
    collection = f"bench_s4_{tag}"
    body = synthetic_job(
        records=10_000_000, record_size=100, shards=1, batch_size=args.recovery_batch,
        key_prefix=f"s4{tag}", collection=collection, name="bench recovery", delay_ms_per_record=args.recovery_delay_ms,
    )
    ctx.settle()
    job_id = ctx.submit(url, body)
    shards, checkpoints = ctx.db["shards"], ctx.db["checkpoints"]
    try:
        # Let the first holder checkpoint a few batches.
        deadline = time.monotonic() + 60
        while True:
            checkpoint = checkpoints.find_one({"job_id": job_id})
            if checkpoint and int(checkpoint.get("batches", 0)) >= 3:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"recovery {tag}: the shard made no progress in 60 s:\n{scheduler.log_tail()}")
            time.sleep(0.05)
        shard = shards.find_one({"job_id": job_id})
        holder = str(shard.get("taken_by") or "")
        victim = next((name for name in workers if holder.startswith(f"bench-{name}/")), None)
        if victim is None:
            raise RuntimeError(f"recovery {tag}: shard held by {holder!r}, not by a live bench worker")
        killed_at = time.monotonic()
        workers[victim].kill()
        ctx.procs.remove(workers[victim])
        # Read where the dead worker left things only now: it can write nothing more.
        shard = shards.find_one({"job_id": job_id})
        checkpoint = checkpoints.find_one({"job_id": job_id})
        token, cursor = int(shard["fencing_token"]), int(checkpoint.get("cursor") or 0)
        redone_before = int(checkpoint.get("records_redone", 0))
        takeover = progress = None
        deadline = killed_at + ttl + 90
        while progress is None:
            now = time.monotonic()
            shard = shards.find_one({"job_id": job_id}, {"fencing_token": 1, "taken_by": 1})
            if takeover is None and int(shard.get("fencing_token", 0)) > token:
                takeover = now
            checkpoint = checkpoints.find_one({"job_id": job_id})
            if int(checkpoint.get("fencing_token", 0)) > token and int(checkpoint.get("cursor") or 0) > cursor:
                progress = now
                takeover = takeover or now
            if now > deadline:
                raise TimeoutError(f"recovery {tag}: no progress {ttl + 90:.0f} s after the kill:\n{scheduler.log_tail()}")
            time.sleep(0.02)
        new_holder = str(shard.get("taken_by") or "")
        return {
            "killed": f"bench-{victim}",
            "resumed_by": new_holder.split("/")[0],
            "takeover_s": round(takeover - killed_at, 3),
            "progress_s": round(progress - killed_at, 3),
            "records_redone": int(checkpoint.get("records_redone", 0)) - redone_before,
            "cursor_at_kill": cursor,
        }, victim
    finally:
        # No trace of this job may reach the next run: no reaping, no retry, no stray task.
        for name in ("jobs", "shards", "checkpoints"):
            ctx.db[name].delete_many({"_id": job_id} if name == "jobs" else {"job_id": job_id})
        ctx.purge(QUEUE_INGEST)
        ctx.drop(collection)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["lease TTL / heartbeat", "taken over after s", "progress again after s", "records redone"]
    rows = [
        [f"{s['ttl_s']:g} s / {s['heartbeat_s']:g} s", fmt_summary(s["takeover_s"], digits=2),
         fmt_summary(s["progress_s"], digits=2), fmt_summary(s["records_redone"])]
        for s in result["settings"].values()
    ]
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v["progress_s"]["median"] for k, v in result["settings"].items()}
