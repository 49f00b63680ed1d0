"""The Celery settings that make shard tasks durable and at-least-once."""

import threading

import pytest
from kombu import Queue
from kombu.exceptions import OperationalError

from cairn_contracts.tasks import TASK_RUN_SHARD
from cairn_contracts.topology import EXCHANGE_DLX, EXCHANGE_TASKS, QUEUE_INGEST, ROUTING_INGEST, queue_spec
from cairn_runtime.celery_config import INGEST_QUEUE, celery_config, control_app
from cairn_testkit.servers import free_port

CONFIG = celery_config("amqp://guest:guest@localhost:5672/%2F")


def test_tasks_are_acked_late_and_rejected_when_the_worker_is_lost() -> None:
    assert CONFIG["task_acks_late"] is True
    assert CONFIG["task_reject_on_worker_lost"] is True


def test_each_worker_process_prefetches_one_task() -> None:
    assert CONFIG["worker_prefetch_multiplier"] == 1


def test_publishes_wait_for_the_broker_confirm_and_persist() -> None:
    assert CONFIG["broker_transport_options"]["confirm_publish"] is True
    assert CONFIG["task_default_delivery_mode"] == "persistent"


def test_broker_url_is_passed_through() -> None:
    assert CONFIG["broker_url"] == "amqp://guest:guest@localhost:5672/%2F"


def test_run_shard_is_routed_to_the_ingest_queue() -> None:
    assert CONFIG["task_routes"][TASK_RUN_SHARD] == {"queue": QUEUE_INGEST}
    assert CONFIG["task_default_queue"] == QUEUE_INGEST
    assert CONFIG["task_create_missing_queues"] is False
    assert CONFIG["task_queues"] == (INGEST_QUEUE,)


def test_ingest_queue_matches_the_declared_topology() -> None:
    spec = queue_spec(QUEUE_INGEST)

    assert isinstance(INGEST_QUEUE, Queue)
    assert INGEST_QUEUE.name == QUEUE_INGEST
    assert INGEST_QUEUE.exchange.name == EXCHANGE_TASKS and INGEST_QUEUE.exchange.type == "direct"
    assert INGEST_QUEUE.routing_key == ROUTING_INGEST
    assert INGEST_QUEUE.durable is True
    assert INGEST_QUEUE.queue_arguments == spec.arguments
    assert INGEST_QUEUE.queue_arguments["x-dead-letter-exchange"] == EXCHANGE_DLX


def test_only_json_is_accepted() -> None:
    assert CONFIG["task_serializer"] == "json"
    assert CONFIG["accept_content"] == ["json"]


@pytest.mark.parametrize("pooled", [True, False])
def test_a_control_call_gives_up_while_the_broker_stays_away(pooled: bool) -> None:
    """kombu's pidbox (remote control) publishes with an unbounded retry: once the broker went
    away mid-publish, the calling thread reconnected for the whole outage (the gateway's control
    threads stuck, the process unable to exit). The control app's connections, pooled or not,
    give up after a few reconnects. The broker's port here refuses every connection."""
    app = control_app(f"amqp://guest:guest@127.0.0.1:{free_port()}//", "control-retry-test")
    raised: list[BaseException] = []

    def publish() -> None:
        raise ConnectionResetError("the broker went away mid-publish")

    def call() -> None:
        connection = app.pool.acquire(block=True) if pooled else app.connection_for_write()
        with connection:
            try:
                connection.ensure(connection, publish)()  # as kombu.pidbox.Mailbox._publish does
            except BaseException as error:
                raised.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "the call still retries while the broker is away"
    assert len(raised) == 1 and isinstance(raised[0], OperationalError), raised
