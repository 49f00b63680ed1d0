"""What a worker process works with: its MongoDB client, leases, runner and publisher.

Built once per process, after the prefork fork (a MongoClient must not cross a fork), and held
by the tasks themselves (`WorkerTask`), not by module-level state.
"""

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery, Task

from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.publisher import BrokerPublisher
from cairn_ingest_worker.runner import ShardRunner
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.tenancy import TenantNamespaces
from cairn_runtime.mongo import sync_client


@dataclass(frozen=True)
class WorkerContext:
    settings: WorkerSettings
    runner: ShardRunner
    publisher: BrokerPublisher


# (shards, checkpoints, worker_id, ttl_s, *, jobs): ShardLeases or a benchmark's subclass
logger = logging.getLogger(__name__)
LeasesFactory = Callable[..., ShardLeases]


def build_context(settings: WorkerSettings, app: Celery, leases: LeasesFactory = ShardLeases) -> WorkerContext:
    """The context of this process. `leases(shards, checkpoints, worker_id, ttl_s, jobs=...)` builds the
    lease store: `ShardLeases` in production (a benchmark injects its own: bench/worker.py)."""
    client = sync_client(settings.mongodb_uri)
    db = client[settings.mongodb_database]
    worker_id = f"{settings.worker_id}/{os.getpid()}"
    runner = ShardRunner(
        leases=leases(db[SHARDS], db[CHECKPOINTS], worker_id, settings.lease_ttl_s, jobs=db[JOBS]),
        jobs=db[JOBS],
        shards=db[SHARDS],
        records_db=db,  # unused: `namespaces` gives each job its tenant's databases (tenancy.py)
        source_db=db,
        namespaces=TenantNamespaces(db),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        slice_s=settings.task_slice_s,
        batch_time_limit_s=settings.batch_time_limit_s,
        # For pipelines (RunContext): a client connects on first use, so a worker whose
        # pipelines never touch Redis never needs it.
        redis=redis.Redis.from_url(settings.redis_url),
        redis_prefix=settings.redis_prefix,
        secrets=settings.secret_values(),
        secret_hosts=settings.secret_hosts(),
        secret_tenants=settings.secret_tenants(),
        allow_private_networks=settings.http_allow_private_networks,
    )
    unbound = sorted(set(settings.secrets) - set(settings.secret_hosts()))
    if unbound:
        logger.warning("secrets %s are bound to no host: any job submitter may send them to any host (CAIRN_SECRETS)", unbound)
    return WorkerContext(settings=settings, runner=runner, publisher=BrokerPublisher(app))


class WorkerTask(Task):
    """Base class of the worker's Celery tasks: the task carries its process's `WorkerContext`.

    Celery instantiates a task once per process, so the context is built lazily on first use in
    each pool process (after the prefork fork: a MongoClient must not cross a fork) and cached on
    the task. `build_context` (a `() -> WorkerContext`, set per app by `register_tasks`) builds it.
    """

    build_context: Callable[[], WorkerContext]
    _context: WorkerContext | None = None
    _context_pid = 0
    _context_lock = threading.Lock()  # the threads pool runs one task object in several threads

    @property
    def context(self) -> WorkerContext:
        with self._context_lock:
            if self._context is None or self._context_pid != os.getpid():
                self._context = self.build_context()
                self._context_pid = os.getpid()
            return self._context
