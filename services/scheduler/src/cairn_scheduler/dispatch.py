"""Dispatch of shard tasks through Celery's own client, so the message is a genuine Celery task
(protocol, headers, trace context via the Celery instrumentation) with publisher confirms."""

import asyncio

from celery import Celery

from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_runtime.celery_config import celery_config


class CeleryDispatcher:
    def __init__(self, app: Celery) -> None:
        self._app = app

    @classmethod
    def for_broker(cls, broker_url: str) -> "CeleryDispatcher":
        app = Celery("cairn-scheduler")
        app.conf.update(celery_config(broker_url))
        return cls(app)

    async def dispatch(self, task: RunShard | RunFrontier, priority: int) -> None:
        # kombu is blocking; with confirm_publish the call returns once the broker confirmed.
        name = TASK_RUN_FRONTIER if isinstance(task, RunFrontier) else TASK_RUN_SHARD
        await asyncio.to_thread(self._app.send_task, name, kwargs=task.model_dump(), priority=priority)
