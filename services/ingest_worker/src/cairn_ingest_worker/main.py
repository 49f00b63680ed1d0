"""`cairn-ingest-worker`: a Celery worker consuming the ingest queue."""

from cairn_ingest_worker.bootstrap import run_worker
from cairn_ingest_worker.celery_app import app, settings


def main() -> None:
    run_worker(app, settings)


if __name__ == "__main__":
    main()
