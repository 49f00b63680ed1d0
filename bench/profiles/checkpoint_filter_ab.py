"""A/B of the hot-path change: the per-batch checkpoint write by (shard_key, sub_key) vs by `_id`.

    uv run --no-sync python bench/profiles/checkpoint_filter_ab.py [--uri mongodb://127.0.0.1:27017]

Against the MongoDB server `make up` runs, in a scratch database (dropped afterwards): a
checkpoints collection with Cairn's indexes and `--history` other checkpoints, then `--batches`
cycles of (insert_many of `--batch` 1 KB records, fenced checkpoint update), once per filter,
alternating `--repeats` times. Prints wall time, the server process's CPU time (when it is local)
and the time in the updates. On MongoDB both filters are one index lookup; on nx-27017, which
uses no compound index for a lookup, the (shard_key, sub_key) filter scans the collection.
"""

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pymongo import MongoClient  # noqa: E402
from pymongo.uri_parser import parse_uri  # noqa: E402

from bench.procs import listening_pid, process_cpu_s  # noqa: E402


def run_ab(uri: str, history: int = 2000, batches: int = 20, batch: int = 100, repeats: int = 3) -> dict:
    port = parse_uri(uri)["nodelist"][0][1]
    pid = listening_pid(port)
    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=5000)
    db = client[f"bench_scratch_ab_{int(time.time())}"]
    payload = ("cairn" * 300)[:1024]
    results: dict[str, list[dict[str, float | None]]] = {"shard_key+sub_key": [], "_id": []}
    try:
        checkpoints = db.checkpoints
        checkpoints.create_index([("shard_key", 1), ("sub_key", 1)], unique=True)
        checkpoints.create_index([("job_id", 1)])
        checkpoints.insert_many(
            [{"_id": f"h{i // 8}:{i % 8:04d}/main", "shard_key": f"h{i // 8}:{i % 8:04d}", "sub_key": "main",
              "job_id": f"h{i // 8}", "cursor": 0, "fencing_token": 1} for i in range(history)]
        )
        checkpoints.insert_one({"_id": "X/main", "shard_key": "X", "sub_key": "main", "job_id": "X", "cursor": 0,
                                "fencing_token": 1, "records_done": 0, "records_written": 0, "records_redone": 0, "batches": 0})
        n = 0
        for rep in range(repeats):
            for mode in results if rep % 2 == 0 else reversed(list(results)):
                target = db[f"records_{rep}_{mode.replace('+', '_')}"]
                where = {"shard_key": "X", "sub_key": "main"} if mode == "shard_key+sub_key" else {"_id": "X/main"}
                cpu0 = process_cpu_s(pid) if pid else None
                t0, in_updates = time.perf_counter(), 0.0
                for _ in range(batches):
                    target.insert_many([{"_id": f"k{n + i}", "seq": n + i, "payload": payload} for i in range(batch)], ordered=False)
                    n += batch
                    u0 = time.perf_counter()
                    checkpoints.find_one_and_update(
                        {**where, "fencing_token": 1},
                        {"$set": {"cursor": n, "updated_at": datetime.now(UTC)},
                         "$inc": {"records_done": batch, "records_written": batch, "records_redone": 0, "batches": 1}},
                        projection={"cancel_requested": 1},
                    )
                    in_updates += time.perf_counter() - u0
                cpu1 = process_cpu_s(pid) if pid else None
                results[mode].append({
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "server_cpu_s": round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None,
                    "checkpoint_ms": round(in_updates / batches * 1000, 2),
                })
    finally:
        client.drop_database(db.name)
        client.close()
    return {"params": {"history": history, "batches": batches, "batch": batch, "repeats": repeats}, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="mongodb://127.0.0.1:27017")
    parser.add_argument("--history", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.stdout.write(json.dumps(run_ab(args.uri, args.history, args.batches, args.batch, args.repeats), indent=1) + "\n")


if __name__ == "__main__":
    main()
