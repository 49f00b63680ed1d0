"""The worker's wiring: settings → Celery app with its tasks and the signals wiring logging,
tracing, metrics and indexes; `run_worker` starts it consuming the ingest queue.

`celery_app.py` builds the production app from it; a benchmark builds its own with other leases
(bench/worker.py), without the production module's app being created in the same process.
"""

import importlib
import logging
from functools import partial

from celery import Celery, signals
from pymongo.errors import ConnectionFailure

from cairn_contracts.namespaces import PIPELINES
from cairn_contracts.topology import QUEUE_INGEST
from cairn_ingest_worker import control  # noqa: F401  (registers Cairn's remote-control command)
from cairn_ingest_worker.catalog import announce_catalog
from cairn_ingest_worker.consumer import MAX_BODY_CONF, refuse_compression
from cairn_ingest_worker.context import LeasesFactory, build_context
from cairn_ingest_worker.leases import ShardLeases
from cairn_ingest_worker.observability import connect_signals
from cairn_ingest_worker.pipelines import catalog
from cairn_ingest_worker.publisher import declare_topology
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.tasks import register_tasks
from cairn_runtime.celery_config import celery_config, worker_hostname
from cairn_runtime.header_depth import bound_header_depth
from cairn_runtime.instrumentation import instrument_celery, instrument_clients
from cairn_runtime.log import configure_logging
from cairn_runtime.metrics import serve_metrics
from cairn_runtime.mongo import ensure_indexes_sync, sync_client
from cairn_runtime.tracing import setup_tracing

logger = logging.getLogger(__name__)


def create_app(settings: WorkerSettings, leases: LeasesFactory = ShardLeases) -> Celery:
    """The worker's Celery app; `leases` builds each process's lease store (see `build_context`).

    Raises ImportError if `settings.test_pipeline_module` is set and cannot be imported."""
    if settings.test_pipeline_module:
        # Test-only hook: imported before the pool forks, so every pool process has its pipelines.
        logger.warning("test pipelines loaded from %s (never in production)", settings.test_pipeline_module)
        importlib.import_module(settings.test_pipeline_module)
    app = Celery("cairn-ingest-worker")
    app.conf.update(celery_config(settings.amqp_url))
    app.conf.worker_concurrency = settings.worker_concurrency
    app.conf.worker_send_task_events = settings.worker_task_events
    # Messages Celery cannot read are dead-lettered, not dropped (consumer.py).
    app.conf.worker_consumer = "cairn_ingest_worker.consumer:DeadLetteringConsumer"
    app.conf[MAX_BODY_CONF] = settings.max_task_body_bytes
    refuse_compression()  # before any message is built: kombu would inflate it ahead of the guard
    bound_header_depth()  # a table nested thousands deep would stop the consumer (header_depth.py)
    # Every delivery is bounded in time, a batch too (checked only between batches otherwise):
    # the soft limit interrupts the run (BatchTimedOut, retryable, nothing committed), the hard
    # limit replaces the pool process; both well under RabbitMQ's consumer_timeout.
    app.conf.task_soft_time_limit = settings.soft_time_limit_s
    app.conf.task_time_limit = settings.time_limit_s
    # Each pool process builds its MongoDB client, runner and publisher once, on the task (WorkerTask).
    register_tasks(app, partial(build_context, settings, app, leases))

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: object) -> None:
        configure_logging(settings.service_name, settings.log_level, settings.log_format)

    @signals.worker_init.connect(weak=False)
    def _prepare(**_: object) -> None:
        client = sync_client(settings.mongodb_uri)
        try:
            ensure_indexes_sync(client[settings.mongodb_database])
            # The gateway accepts only jobs of announced pipelines, checked against their schema.
            announce_catalog(client[settings.mongodb_database][PIPELINES], catalog(), settings.worker_id)
        except ConnectionFailure as error:
            # The worker must run while MongoDB is away (its tasks wait for the store); the
            # indexes are ensured again by the other services and at the next start, and the
            # catalog is announced by the next worker that starts with the store up.
            logger.warning("MongoDB unreachable at start; indexes and catalog not written by this worker: %s", error)
        finally:
            client.close()
        with app.connection_for_write() as connection:
            declare_topology(connection)
        serve_metrics(settings.metrics_port, settings.metrics_host)

    @signals.worker_process_init.connect(weak=False)
    def _child(**_: object) -> None:
        setup_tracing(
            settings.service_name,
            settings.trace_exporter,
            trace_file=settings.trace_file,
            otlp_endpoint=settings.otlp_endpoint,
        )
        instrument_celery()  # before connect_signals: its task span must be current for ours
        instrument_clients()  # before this child's MongoClient is built
        connect_signals()

    return app


def run_worker(app: Celery, settings: WorkerSettings) -> None:
    """Run `app` as a worker consuming the ingest queue (blocks until it shuts down)."""
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={QUEUE_INGEST}",
            f"--hostname={worker_hostname(settings.worker_id)}",
            "--without-gossip",
            "--without-mingle",
            # Heartbeats on (worker events): the gateway's worker list and Flower show their age.
        ]
    )
