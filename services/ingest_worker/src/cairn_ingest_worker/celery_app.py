"""The production worker app: `celery -A cairn_ingest_worker.celery_app worker` and the
`cairn-ingest-worker` script (main.py) both load it. The wiring itself is bootstrap.py.
"""

from cairn_ingest_worker.bootstrap import create_app
from cairn_ingest_worker.settings import WorkerSettings

__all__ = ["app", "create_app", "settings"]

settings = WorkerSettings()
app = create_app(settings)
