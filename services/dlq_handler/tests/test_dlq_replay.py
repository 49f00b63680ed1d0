"""Replay, discard and settling against the real MongoDB-wire server, broker and Redis.

Replayed tasks go out through the real Celery client and are read back from the ingest queue.
"""

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from kombu.exceptions import OperationalError

from cairn_contracts.messages import DeadLetterCommand, ShardFinished
from cairn_contracts.states import DeadLetterStatus, JobState, ReplayOutcome, ShardState
from cairn_contracts.store import DLQ_COMMANDS, JOBS, SHARDS, STATUS_CACHE_KEY, TASK_ERRORS, ShardRecord
from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_contracts.topology import QUEUE_INGEST
from cairn_dlq_handler.replay import DeadLetterCommands
from cairn_dlq_handler.status_cache import RedisStatusCache
from cairn_runtime.celery_config import ShardTaskSender
from cairn_runtime.consumer import Unprocessable
from cairn_runtime.mongo import ensure_indexes
from cairn_testkit.aio import drain

JOB = "job-r"
FAILED_SHARD = f"{JOB}:0001"
ENTRY = f"dl-{FAILED_SHARD}"


@pytest.fixture
async def db(async_mongo_db):
    await ensure_indexes(async_mongo_db)
    return async_mongo_db


@pytest.fixture
async def cache(test_env):
    client = aioredis.Redis.from_url(test_env.redis_url)
    yield RedisStatusCache(client, test_env.redis_prefix)
    await client.aclose()


@pytest.fixture
def commands(db, broker, test_env, cache) -> DeadLetterCommands:
    return DeadLetterCommands(db, ShardTaskSender.for_broker(test_env.amqp_url, "cairn-dlq-handler"), cache)


async def seed_failure(db, *, strategy: str = "range", shard_state: ShardState = ShardState.FAILED, entry: dict | None = None) -> None:
    """A finished job: shard 0 succeeded, shard 1 dead-lettered after 3 attempts (entry ENTRY)."""
    now = datetime.now(UTC)
    await db[JOBS].insert_one(
        {
            "_id": JOB, "tenant": "default", "pipeline": "synthetic", "priority": 3, "state": JobState.FAILURE,
            "shard_count": 2, "result": {"failed_shards": [FAILED_SHARD]}, "finished_at": now, "created_at": now,
        }
    )
    def shard(index: int, state: ShardState, attempts: int) -> dict:
        return ShardRecord(
            shard_key=f"{JOB}:{index:04d}", job_id=JOB, index=index, strategy=strategy, range_start=index * 10,
            range_end=(index + 1) * 10, records_estimate=10, priority=3, state=state, attempts=attempts, fencing_token=3,
        ).to_document()

    await db[SHARDS].insert_one(shard(0, ShardState.SUCCEEDED, 1))
    await db[SHARDS].insert_one(
        {
            **shard(1, shard_state, 3),
            "dead_letter_id": ENTRY, "last_error": "RetryableError: down", "retries": [{"attempt": 1}, {"attempt": 2}],
            "queued_task": f"{JOB}:0000",  # the bundle it was first sent in
        }
    )
    await db[TASK_ERRORS].insert_one(
        {
            "_id": ENTRY, "kind": "service", "status": DeadLetterStatus.OPEN, "reason": "retries_exhausted",
            "job_id": JOB, "shard_key": FAILED_SHARD, "attempts": 3, "created_at": now, "replays": [], **(entry or {}),
        }
    )


def command(action: str = "replay", command_id: str = "cmd-1", entry: str = ENTRY) -> DeadLetterCommand:
    return DeadLetterCommand(command_id=command_id, action=action, dead_letter_id=entry, requested_by="alice", note="fixed")  # type: ignore[arg-type]


def celery_task(message: Any) -> tuple[str, dict]:
    _, kwargs, _ = json.loads(message.body)
    return message.headers["task"], kwargs


async def test_a_replay_reopens_the_shard_and_the_job_and_sends_the_shard_task(commands, db, broker, cache, test_env) -> None:
    await seed_failure(db)
    cache_key = STATUS_CACHE_KEY.format(prefix=test_env.redis_prefix, tenant="default", job_id=JOB)
    await cache._client.set(cache_key, "a FAILURE status")

    assert await commands.replay(command()) == "dispatched"

    shard = await db[SHARDS].find_one({"_id": FAILED_SHARD})
    assert shard["state"] == ShardState.QUEUED and shard["attempts"] == 0
    assert shard["replays"] == 1 and shard["attempts_before_replays"] == 3
    assert shard["replay_of"] == ENTRY and shard["replay_command_id"] == "cmd-1" and shard["retries"] == []
    assert shard["queued_task"] is None  # sent alone: a task of its own for fair dispatch
    job = await db[JOBS].find_one({"_id": JOB})
    assert job["state"] == JobState.STARTED and "result" not in job and "finished_at" not in job
    assert await cache._client.get(cache_key) is None
    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.REPLAYING
    assert entry["replay"]["requested_by"] == "alice" and entry["replay"]["note"] == "fixed"
    assert entry["replay"]["dispatches"] == 1
    sent = await drain(broker.queues[QUEUE_INGEST])
    assert [celery_task(m) for m in sent] == [(TASK_RUN_SHARD, {"schema_version": 1, "job_id": JOB, "shard_key": FAILED_SHARD})]
    assert sent[0].priority == 3


async def test_a_redelivered_command_continues_its_replay_without_reopening_twice(commands, db, broker) -> None:
    await seed_failure(db)
    await commands.replay(command())

    assert await commands.replay(command()) == "dispatched"  # e.g. the ack was lost in a crash

    shard = await db[SHARDS].find_one({"_id": FAILED_SHARD})
    assert shard["replays"] == 1 and shard["attempts_before_replays"] == 3
    assert (await db[TASK_ERRORS].find_one({"_id": ENTRY}))["replay"]["dispatches"] == 2
    assert len(await drain(broker.queues[QUEUE_INGEST])) == 2  # harmless: the lease claim runs it once


async def test_a_second_replay_of_an_entry_in_flight_is_refused_and_sends_nothing(commands, db, broker) -> None:
    await seed_failure(db)
    await commands.replay(command(command_id="cmd-1"))
    await drain(broker.queues[QUEUE_INGEST])

    assert await commands.replay(command(command_id="cmd-2")) == "refused"

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.REPLAYING and entry["replay"]["command_id"] == "cmd-1"
    assert entry["replays_refused"] == 1
    assert await drain(broker.queues[QUEUE_INGEST]) == []


async def test_a_replay_that_could_not_be_published_is_taken_up_again_by_the_redelivered_command(db, broker, test_env) -> None:
    await seed_failure(db)
    unreachable = ShardTaskSender.for_broker("amqp://guest:guest@127.0.0.1:1//", "cairn-dlq-handler")
    unreachable._app.conf.broker_connection_timeout = 0.5

    with pytest.raises((OperationalError, OSError)):  # the broker refused the connection
        await DeadLetterCommands(db, unreachable).replay(command())
    assert (await db[TASK_ERRORS].find_one({"_id": ENTRY}))["replay"]["dispatches"] == 0

    working = DeadLetterCommands(db, ShardTaskSender.for_broker(test_env.amqp_url, "cairn-dlq-handler"))
    assert await working.replay(command()) == "dispatched"
    assert len(await drain(broker.queues[QUEUE_INGEST])) == 1
    assert (await db[SHARDS].find_one({"_id": FAILED_SHARD}))["replays"] == 1


async def test_the_replay_succeeds_once_the_shard_does(commands, db) -> None:
    await seed_failure(db)
    await commands.replay(command())
    assert await commands.settle(ENTRY) is None  # still queued

    await db[SHARDS].update_one({"_id": FAILED_SHARD}, {"$set": {"state": ShardState.SUCCEEDED}})
    await commands.shard_finished(ShardFinished(job_id=JOB, shard_key=FAILED_SHARD, outcome="succeeded", records_done=10))

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.REPLAYED and entry["replay"]["outcome"] == ReplayOutcome.SUCCEEDED
    assert [r["outcome"] for r in entry["replays"]] == ["succeeded"] and entry["replays"][0]["requested_by"] == "alice"
    assert await commands.settle(ENTRY) is None  # settled once


async def test_a_replay_whose_shard_fails_again_points_to_the_new_failure(commands, db) -> None:
    await seed_failure(db)
    await commands.replay(command())
    await db[SHARDS].update_one({"_id": FAILED_SHARD}, {"$set": {"state": ShardState.FAILED, "dead_letter_id": "dl-new"}})

    assert await commands.settle_all() == 1

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.REPLAYED and entry["replay"]["outcome"] == ReplayOutcome.FAILED_AGAIN
    assert entry["superseded_by"] == "dl-new"


async def test_a_job_left_failed_by_a_stale_roll_up_is_reopened_when_the_replay_succeeds(commands, db) -> None:
    await seed_failure(db)
    await commands.replay(command())
    # The scheduler's roll-up read the shards just before the reopen and wrote FAILURE after it.
    await db[JOBS].update_one({"_id": JOB}, {"$set": {"state": JobState.FAILURE}})
    await db[SHARDS].update_one({"_id": FAILED_SHARD}, {"$set": {"state": ShardState.SUCCEEDED}})

    assert await commands.settle(ENTRY) == ReplayOutcome.SUCCEEDED

    assert (await db[JOBS].find_one({"_id": JOB}))["state"] == JobState.STARTED  # the roll-up makes it SUCCESS


async def test_a_shard_no_longer_failed_by_the_entry_is_not_replayed_and_the_entry_stays_open(commands, db, broker) -> None:
    await seed_failure(db, shard_state=ShardState.SUCCEEDED)

    assert await commands.replay(command()) == "refused"

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.OPEN and entry["replay"]["outcome"] == ReplayOutcome.REFUSED
    assert "SUCCEEDED" in entry["replay"]["note"] and [r["outcome"] for r in entry["replays"]] == ["refused"]
    assert (await db[JOBS].find_one({"_id": JOB}))["state"] == JobState.FAILURE
    assert await drain(broker.queues[QUEUE_INGEST]) == []


async def test_an_entry_without_a_shard_cannot_be_replayed(commands, db, broker) -> None:
    await seed_failure(db, entry={"shard_key": None, "reason": "contract_violation"})

    assert await commands.replay(command()) == "refused"

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.OPEN and entry["replays_refused"] == 1 and "replay" not in entry
    assert await drain(broker.queues[QUEUE_INGEST]) == []


async def test_an_unknown_entry_is_unprocessable(commands) -> None:
    with pytest.raises(Unprocessable):
        await commands.replay(command(entry="no-such-entry"))
    with pytest.raises(Unprocessable):
        await commands.discard(command("discard", entry="no-such-entry"))


async def test_a_lease_frontier_item_is_replayed_by_a_runner_of_its_job(commands, db, broker) -> None:
    await seed_failure(db, strategy="lease_frontier")

    await commands.replay(command())

    sent = await drain(broker.queues[QUEUE_INGEST])
    assert [celery_task(m) for m in sent] == [(TASK_RUN_FRONTIER, {"schema_version": 1, "job_id": JOB, "lane": 1})]


async def test_discard_closes_an_open_entry_once_and_keeps_it(commands, db, broker) -> None:
    await seed_failure(db)

    assert await commands.handle(command("discard", "d-1")) is None
    assert await commands.discard(command("discard", "d-1")) == "already_done"  # redelivered
    assert await commands.discard(command("discard", "d-2")) == "refused"
    assert await commands.replay(command("replay", "r-1")) == "refused"

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.DISCARDED
    assert entry["discard"]["requested_by"] == "alice" and entry["discard"]["command_id"] == "d-1"
    assert entry["discards_refused"] == 1 and entry["replays_refused"] == 1
    assert (await db[SHARDS].find_one({"_id": FAILED_SHARD}))["state"] == ShardState.FAILED
    assert await drain(broker.queues[QUEUE_INGEST]) == []


async def test_an_entry_being_replayed_cannot_be_discarded(commands, db) -> None:
    await seed_failure(db)
    await commands.replay(command())

    assert await commands.discard(command("discard", "d-1")) == "refused"
    assert (await db[TASK_ERRORS].find_one({"_id": ENTRY}))["status"] == DeadLetterStatus.REPLAYING


async def test_a_dead_letter_of_a_cancelled_job_is_not_replayed(commands, db, broker) -> None:
    await seed_failure(db)
    await db[JOBS].update_one({"_id": JOB}, {"$set": {"cancel_requested": True}})

    assert await commands.replay(command()) == "refused"

    entry = await db[TASK_ERRORS].find_one({"_id": ENTRY})
    assert entry["status"] == DeadLetterStatus.OPEN and "cancelled" in entry["replay"]["note"]
    assert (await db[SHARDS].find_one({"_id": FAILED_SHARD}))["state"] == ShardState.FAILED
    assert await drain(broker.queues[QUEUE_INGEST]) == []


async def test_each_command_outcome_is_recorded_by_its_id_and_a_redelivery_does_not_rewrite_it(commands, db, broker) -> None:
    await seed_failure(db)
    await db[TASK_ERRORS].update_one({"_id": ENTRY}, {"$set": {"pending_command": {"command_id": "cmd-1", "action": "replay", "at_ms": 1}}})

    await commands.handle(command(command_id="cmd-1"))
    await commands.handle(command(command_id="cmd-2"))
    await commands.handle(command("discard", "d-1"))
    await commands.handle(command(command_id="cmd-1"))  # redelivered
    with pytest.raises(Unprocessable):
        await commands.handle(command(command_id="cmd-3", entry="no-such-entry"))

    outcomes = {c["_id"]: c async for c in db[DLQ_COMMANDS].find({})}
    assert (outcomes["cmd-1"]["status"], outcomes["cmd-1"]["outcome"]) == ("done", "dispatched")
    assert (outcomes["cmd-2"]["outcome"], outcomes["cmd-2"]["detail"]) == ("refused", "entry is replaying")
    assert (outcomes["d-1"]["outcome"], outcomes["d-1"]["action"]) == ("refused", "discard")
    assert outcomes["cmd-3"]["outcome"] == "refused" and "no-such-entry" in outcomes["cmd-3"]["detail"]
    assert outcomes["cmd-1"]["dead_letter_id"] == ENTRY and outcomes["cmd-1"]["requested_by"] == "alice"
    assert "pending_command" not in await db[TASK_ERRORS].find_one({"_id": ENTRY})  # the gateway's claim is released
    await drain(broker.queues[QUEUE_INGEST])


async def test_a_refused_replay_records_why(commands, db, broker) -> None:
    await seed_failure(db, shard_state=ShardState.SUCCEEDED)

    await commands.handle(command())

    recorded = await db[DLQ_COMMANDS].find_one({"_id": "cmd-1"})
    assert recorded["outcome"] == "refused" and "SUCCEEDED" in recorded["detail"]
    assert await drain(broker.queues[QUEUE_INGEST]) == []
