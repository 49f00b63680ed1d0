"""Main baseline of scenario 1: the Celery app a competent Celery user writes, one task per chunk.

The producer sends one `store_chunk.delay(...)` per 1,000 records (the key range of the chunk,
not the records: the task produces them, as a Cairn shard reads its own); each task builds its
records exactly as the `synthetic` pipeline does (same `_id`, fields, cleaning) and stores them
with one unordered `insert_many` (duplicates of a redelivered chunk count as already stored).
`acks_late`, `reject_on_worker_lost`, prefetch multiplier 1, no result backend; one MongoClient
per worker process. No checkpoints, no leases, no per-chunk bookkeeping: what Cairn adds on top
is what this peer does not pay for.

Worker:   python -m celery -A bench.baseline.celery_chunks worker -Q bench.baseline.chunks
Settings: BENCH_BASELINE_BROKER, MONGODB_URI, BENCH_BASELINE_DATABASE (environment).
"""

from typing import Any

from pymongo.errors import BulkWriteError

from bench.baseline.celery_records import _database, baseline_app, clean, filler, make_record

QUEUE = "bench.baseline.chunks"
TASK = "bench.baseline.store_chunk"
CHUNK = 1000

app = baseline_app("bench-baseline-chunks", QUEUE, worker_prefetch_multiplier=1)


@app.task(name=TASK)
def store_chunk(key_prefix: str, start: int, end: int, record_size: int, collection: str, job_id: str) -> int:
    """Build records [start, end) and store them with one unordered insert_many; returns how many were new."""
    fill = filler(record_size)
    records: list[dict[str, Any]] = [clean(make_record(key_prefix, index, fill), job_id) for index in range(start, end)]
    try:
        return len(_database()[collection].insert_many(records, ordered=False).inserted_ids)
    except BulkWriteError as error:  # a redelivered chunk: the stored ones are duplicates
        return int(error.details.get("nInserted", 0))
