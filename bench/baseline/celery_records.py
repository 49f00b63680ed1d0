"""Baseline of scenario 1: the common Celery approach, one task per record.

The producer calls `store_record.delay(record, ...)` once per record; each task stores its one
record with `insert_one` (a duplicate key counts as already stored, so it is exactly-once too).
Celery's usual settings for reliable work: `acks_late`, `reject_on_worker_lost`, the default
prefetch multiplier, no result backend. One MongoClient per worker process (created after the
fork), i.e. a fair, well-written baseline rather than a strawman.

It is its own Celery app on its own queue (`bench.baseline.records`) in the bench's vhost, and it
writes the same records (same `_id`, fields and cleaning as the `synthetic` pipeline) to the same
MongoDB server and database as Cairn.

Worker:   python -m celery -A bench.baseline.celery_records worker -Q bench.baseline.records
Settings: BENCH_BASELINE_BROKER, MONGODB_URI, BENCH_BASELINE_DATABASE (environment).
"""

import hashlib
import os
import threading
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from pymongo import MongoClient
from pymongo.errors import DuplicateKeyError

QUEUE = "bench.baseline.records"
TASK = "bench.baseline.store_record"



def baseline_app(name: str, queue: str, **extra: Any) -> Celery:
    """A plain Celery app as a competent user configures one (JSON, late acks, no results, no
    events or remote control): the baselines' shared configuration, `extra` on top."""
    app = Celery(name)
    app.conf.update(
        broker_url=os.environ.get("BENCH_BASELINE_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        **extra,
    )
    return app


app = baseline_app("bench-baseline", QUEUE)

_lock = threading.Lock()
_client: tuple[int, MongoClient] | None = None


def _database() -> Any:
    """One MongoClient per process (a client must not cross a fork)."""
    global _client
    with _lock:
        if _client is None or _client[0] != os.getpid():
            _client = (os.getpid(), MongoClient(os.environ["MONGODB_URI"], serverSelectionTimeoutMS=5000))
        return _client[1][os.environ["BENCH_BASELINE_DATABASE"]]


def make_record(key_prefix: str, index: int, filler: str) -> dict[str, Any]:
    """The record the `synthetic` pipeline reads for key `index` (same `_id`, fields, payload)."""
    return {"_id": f"{key_prefix}-{index:012d}", "seq": index, "payload": filler}


def filler(record_size: int) -> str:
    return ("cairn" * (record_size // 5 + 1))[:record_size]


def clean(record: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The synthetic pipeline's cleaning and Cairn's store fields, in place."""
    record["checksum"] = hashlib.blake2b(record["payload"].encode(), digest_size=8).hexdigest()
    record["job_id"] = job_id
    record["ingested_at"] = datetime.now(UTC)
    return record


@app.task(name=TASK)
def store_record(record: dict[str, Any], collection: str, job_id: str) -> bool:
    """Clean and store one record, as the synthetic pipeline and Cairn's store do."""
    clean(record, job_id)
    try:
        _database()[collection].insert_one(record)
    except DuplicateKeyError:
        return False
    return True
