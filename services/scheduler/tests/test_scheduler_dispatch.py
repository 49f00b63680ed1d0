"""ShardTaskSender puts a genuine Celery task on the ingest queue of the real broker."""

import json

from celery import Celery

from cairn_contracts.messages import RunFrontier, RunShard
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_contracts.topology import QUEUE_INGEST, Route
from cairn_runtime.celery_config import ShardTaskSender, celery_config
from cairn_testkit.aio import next_message


async def test_dispatch_puts_a_persistent_celery_task_with_priority_on_the_ingest_queue(broker, test_env) -> None:
    app = Celery("cairn-scheduler-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    try:
        await ShardTaskSender(app).dispatch(RunShard(job_id="job-x", shard_key="job-x:0002"), priority=3)
    finally:
        app.close()

    message = await next_message(broker.queues[QUEUE_INGEST])
    assert message.headers["task"] == TASK_RUN_SHARD
    # the route the message declares is the one it travelled (Celery's: default exchange, queue name)
    assert Route(message.exchange, message.routing_key) == RunShard(job_id="job-x", shard_key="job-x:0002").route()
    assert message.priority == 3
    assert message.delivery_mode == 2
    args, kwargs, _ = json.loads(message.body)
    assert args == []
    assert RunShard.model_validate(kwargs) == RunShard(job_id="job-x", shard_key="job-x:0002")


async def test_dispatch_of_a_frontier_runner_sends_the_run_frontier_task(broker, test_env) -> None:
    app = Celery("cairn-scheduler-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    try:
        await ShardTaskSender(app).dispatch(RunFrontier(job_id="job-y", lane=1), priority=1)
    finally:
        app.close()

    message = await next_message(broker.queues[QUEUE_INGEST])
    assert message.headers["task"] == TASK_RUN_FRONTIER
    _, kwargs, _ = json.loads(message.body)
    assert RunFrontier.model_validate(kwargs) == RunFrontier(job_id="job-y", lane=1)


def test_for_broker_configures_celery_from_the_shared_config() -> None:
    dispatcher = ShardTaskSender.for_broker("amqp://guest:guest@127.0.0.1:5672/some-vhost", "cairn-scheduler")
    conf = dispatcher._app.conf

    assert conf.broker_url == "amqp://guest:guest@127.0.0.1:5672/some-vhost"
    assert conf.task_routes[TASK_RUN_SHARD] == {"queue": QUEUE_INGEST}
    assert conf.broker_transport_options == {"confirm_publish": True}


async def test_dispatch_many_sends_every_task_confirmed_in_one_batch(broker, test_env) -> None:
    # Issue 14: the tasks of a job's shards are published together and their confirms awaited
    # together; each is the same genuine Celery task `dispatch` sends.
    app = Celery("cairn-scheduler-tests")
    app.conf.update(celery_config(test_env.amqp_url))
    tasks = [RunShard(job_id="job-z", shard_key=f"job-z:{i:04d}") for i in range(300)]
    try:
        await ShardTaskSender(app).dispatch_many(tasks, priority=2)
    finally:
        app.close()

    received = []
    for _ in tasks:
        message = await next_message(broker.queues[QUEUE_INGEST])
        assert message.headers["task"] == TASK_RUN_SHARD and message.priority == 2 and message.delivery_mode == 2
        received.append(RunShard.model_validate(json.loads(message.body)[1]).shard_key)
    assert sorted(received) == [t.shard_key for t in tasks]
