"""The broker layout and the store layout are self-consistent."""

from cairn_contracts import store, topology
from cairn_contracts.tasks import TASK_RUN_SHARD

DECLARED = {e.name for e in topology.EXCHANGES}
WORK_QUEUES = [q for q in topology.QUEUES if q.name != topology.QUEUE_DLQ]


def test_every_binding_refers_to_a_declared_exchange() -> None:
    bindings = [(q.name, exchange) for q in topology.QUEUES for exchange, _ in q.bindings]

    assert bindings
    assert [b for b in bindings if b[1] not in DECLARED] == []


def test_every_queue_is_bound() -> None:
    assert all(q.bindings for q in topology.QUEUES)


def test_work_queues_dead_letter_to_the_dlx() -> None:
    assert WORK_QUEUES
    for queue in WORK_QUEUES:
        assert queue.arguments.get("x-dead-letter-exchange") == topology.EXCHANGE_DLX, queue.name


def test_dlq_has_no_dead_letter_exchange_and_takes_everything_from_the_dlx() -> None:
    dlq = topology.queue_spec(topology.QUEUE_DLQ)

    assert "x-dead-letter-exchange" not in dlq.arguments
    assert dlq.bindings == ((topology.EXCHANGE_DLX, "#"),)


def test_dlx_is_a_topic_exchange() -> None:
    assert {e.name: e.type for e in topology.EXCHANGES}[topology.EXCHANGE_DLX] == "topic"


def test_priority_queues_allow_the_four_priorities() -> None:
    for name in (topology.QUEUE_SCHEDULER_COMMANDS, topology.QUEUE_INGEST):
        assert topology.queue_spec(name).arguments["x-max-priority"] == topology.MAX_PRIORITY == 4


def test_routing_keys_reach_their_queues() -> None:
    def routes(queue: str) -> set[tuple[str, str]]:
        return set(topology.queue_spec(queue).bindings)

    assert (topology.EXCHANGE_COMMANDS, topology.ROUTING_START_JOB) in routes(topology.QUEUE_SCHEDULER_COMMANDS)
    assert (topology.EXCHANGE_TASKS, topology.ROUTING_INGEST) in routes(topology.QUEUE_INGEST)
    # shard.succeeded / shard.failed match the events queue's topic pattern
    assert (topology.EXCHANGE_EVENTS, "shard.*") in routes(topology.QUEUE_SCHEDULER_EVENTS)
    assert topology.ROUTING_SHARD_SUCCEEDED.startswith("shard.") and topology.ROUTING_SHARD_FAILED.startswith("shard.")


def test_names_are_unique() -> None:
    assert len(DECLARED) == len(topology.EXCHANGES)
    assert len({q.name for q in topology.QUEUES}) == len(topology.QUEUES)


def test_task_name_is_namespaced() -> None:
    assert TASK_RUN_SHARD.startswith("cairn.")


def test_unique_indexes_cover_the_idempotency_keys() -> None:
    unique = {(spec.collection, spec.keys) for spec in store.INDEXES if spec.unique}

    assert (store.SHARDS, (("shard_key", 1),)) in unique
    assert (store.CHECKPOINTS, (("shard_key", 1), ("sub_key", 1))) in unique
    assert (store.DEDUP, (("task_fingerprint", 1),)) in unique
    assert (store.JOBS, (("tenant", 1), ("idempotency_key", 1))) in unique


def test_index_names_are_unique_per_collection() -> None:
    names = [(spec.collection, spec.name) for spec in store.INDEXES]

    assert len(set(names)) == len(names)


def test_idempotency_index_only_covers_jobs_that_have_a_key() -> None:
    # A sparse compound index would index every job (tenant is always set) with a null key, so a
    # second job without Idempotency-Key would collide with the first on real MongoDB.
    spec = next(s for s in store.INDEXES if s.keys == (("tenant", 1), ("idempotency_key", 1)))

    assert spec.unique and not spec.sparse
    assert spec.partial_filter == {"idempotency_key": {"$type": "string"}}
