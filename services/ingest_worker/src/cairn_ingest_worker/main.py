"""`cairn-ingest-worker`: a Celery worker consuming the ingest queue."""

from cairn_contracts.topology import QUEUE_INGEST
from cairn_ingest_worker.celery_app import app, settings


def main() -> None:
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={QUEUE_INGEST}",
            f"--hostname=cairn-ingest@{settings.worker_id}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
