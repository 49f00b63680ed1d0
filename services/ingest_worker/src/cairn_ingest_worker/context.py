"""What a worker process works with: its MongoDB client, leases, runner and publisher.

Built once per process, after the prefork fork (a MongoClient must not cross a fork).
"""

import os
import threading
from dataclasses import dataclass

from celery import Celery

from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.bench_only import UncheckpointedLeases
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_ingest_worker.runner import ShardRunner
from cairn_ingest_worker.settings import WorkerSettings
from cairn_runtime.mongo import sync_client


@dataclass(frozen=True)
class WorkerContext:
    settings: WorkerSettings
    runner: ShardRunner
    publisher: BrokerPublisher


def build_context(settings: WorkerSettings, app: Celery) -> WorkerContext:
    client = sync_client(settings.mongodb_uri)
    db = client[settings.mongodb_database]
    worker_id = f"{settings.worker_id}/{os.getpid()}"
    runner = ShardRunner(
        # UncheckpointedLeases: benchmark-only switch, see bench_only.py.
        leases=(UncheckpointedLeases if settings.bench_disable_checkpoints else ShardLeases)(
            db[SHARDS], db[CHECKPOINTS], worker_id, settings.lease_ttl_s
        ),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,
        source_db=client[settings.source_database or settings.mongodb_database],
        heartbeat_interval_s=settings.heartbeat_interval_s,
        slice_s=settings.task_slice_s,
        batch_time_limit_s=settings.batch_time_limit_s,
    )
    return WorkerContext(settings=settings, runner=runner, publisher=BrokerPublisher(app))


class ContextPerProcess:
    def __init__(self, settings: WorkerSettings, app: Celery) -> None:
        self._settings = settings
        self._app = app
        self._lock = threading.Lock()
        self._context: WorkerContext | None = None
        self._pid = 0

    def get(self) -> WorkerContext:
        with self._lock:
            if self._context is None or self._pid != os.getpid():
                self._context = build_context(self._settings, self._app)
                self._pid = os.getpid()
            return self._context
