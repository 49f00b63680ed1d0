"""The dead-letter API and the failure part of a job's status, driven through ASGI with the app's
lifespan, against this run's MongoDB-wire server, RabbitMQ vhost and Redis prefix."""

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pymongo.database import Database

from cairn_contracts.messages import DeadLetterCommand
from cairn_contracts.states import DeadLetterStatus, JobState, ShardState
from cairn_contracts.store import API_KEYS, JOBS, SHARDS, TASK_ERRORS, TENANTS
from cairn_contracts.topology import HEADER_MESSAGE_TYPE, QUEUE_DLQ_COMMANDS
from cairn_gateway.auth import new_key
from cairn_gateway.dlq import DeadLetterService
from cairn_runtime.amqp import Publisher
from cairn_runtime.payloads import RawPayloads
from cairn_testkit.aio import drain, next_message


@pytest.fixture
def client(client_for) -> httpx.AsyncClient:
    """An admin's client of the default tenant (the dead-letter API is an operator's tool)."""
    return client_for(name="dlq-tests")


@pytest.fixture
async def commands(broker):
    queue = broker.queues[QUEUE_DLQ_COMMANDS]
    await drain(queue)
    return queue


def seed(db: Database, count: int = 1, **fields) -> list[str]:
    """`count` open dead letters of one fresh job (unless fields say otherwise), oldest first."""
    job_id = fields.pop("job_id", f"job-{uuid.uuid4().hex[:8]}")
    start = datetime.now(UTC) - timedelta(minutes=10)
    ids = []
    for index in range(count):
        entry_id = f"dl-{uuid.uuid4().hex[:10]}"
        db[TASK_ERRORS].insert_one(
            {
                "_id": entry_id,
                "kind": "service",
                "status": DeadLetterStatus.OPEN,
                "reason": "retries_exhausted",
                "error_type": "RetryableError",
                "error_message": f"down {index}",
                "stack": "Traceback ...",
                "job_id": job_id,
                "shard_key": f"{job_id}:{index:04d}",
                "pipeline": "synthetic",
                "tenant": "default",
                "attempts": 3,
                "original": {"body": '{"job_id": "x"}', "body_encoding": "utf-8", "headers": {}, "routing_key": "ingest"},
                "created_at": start + timedelta(seconds=index),
                "replays": [],
                **fields,
            }
        )
        ids.append(entry_id)
    return ids


async def test_entries_are_listed_newest_first_filtered_and_paged(client, db) -> None:
    job_ids = seed(db, 3, job_id="job-list")
    other = seed(db, 1, job_id="job-list", reason="poison", error_type="RuntimeError", pipeline="mongo_range", created_at=datetime.now(UTC))
    seed(db, 1, job_id="job-list", tenant="acme")  # another tenant's: never shown to this one

    page = (await client.get("/dlq/entries", params={"job_id": "job-list"})).json()
    assert page["total"] == 4 and [i["id"] for i in page["items"]] == [*other, *reversed(job_ids)]
    assert all(i["replayable"] for i in page["items"]) and "stack" not in page["items"][0]

    async def ids(**params) -> list[str]:
        response = await client.get("/dlq/entries", params={"job_id": "job-list", **params})
        assert response.status_code == 200, response.text
        return [i["id"] for i in response.json()["items"]]

    assert await ids(reason="poison") == other
    assert await ids(error_type="RuntimeError", pipeline="mongo_range") == other
    assert await ids(pipeline="synthetic") == list(reversed(job_ids))
    assert await ids(status="replaying") == []
    created = db[TASK_ERRORS].find_one({"_id": job_ids[1]})["created_at"]
    assert set(await ids(since=created.isoformat(), until=(created + timedelta(seconds=1)).isoformat())) == {job_ids[1]}
    first = (await client.get("/dlq/entries", params={"job_id": "job-list", "limit": 3})).json()
    second = (await client.get("/dlq/entries", params={"job_id": "job-list", "limit": 3, "offset": first["next_offset"]})).json()
    assert first["next_offset"] == 3 and second["next_offset"] is None
    assert [i["id"] for i in first["items"] + second["items"]] == [i["id"] for i in page["items"]]
    assert (await client.get("/dlq/entries", params={"limit": 0})).status_code == 422


async def test_one_entry_is_read_in_full_and_an_unknown_one_is_404(client, db) -> None:
    [entry_id] = seed(db)
    [foreign] = seed(db, tenant="acme")

    entry = (await client.get(f"/dlq/entries/{entry_id}")).json()

    assert entry["id"] == entry_id and entry["stack"] == "Traceback ..." and entry["original"]["routing_key"] == "ingest"
    assert entry["replays"] == [] and entry["replayable"] is True
    assert (await client.get("/dlq/entries/nope")).status_code == 404
    assert (await client.get(f"/dlq/entries/{foreign}")).status_code == 404


async def test_replay_publishes_a_confirmed_command_naming_who_asked(client, db, commands) -> None:
    [entry_id] = seed(db)

    response = await client.post(f"/dlq/entries/{entry_id}/replay", headers={"X-Cairn-Actor": "alice"}, json={"note": "fixed upstream"})

    assert response.status_code == 202, response.text
    message = await next_message(commands)
    assert message.headers[HEADER_MESSAGE_TYPE] == DeadLetterCommand.message_type
    command = DeadLetterCommand.model_validate_json(message.body)
    assert (command.action, command.dead_letter_id, command.requested_by, command.note) == ("replay", entry_id, "alice", "fixed upstream")
    assert response.json() == {
        "command_id": command.command_id, "action": "replay", "dead_letter_id": entry_id, "entry_url": f"/dlq/entries/{entry_id}",
        "command_url": f"/dlq/commands/{command.command_id}",
    }
    assert command.api_key_id is not None
    # Without an actor header, the API key (its name) asked.
    [other] = seed(db)
    assert (await client.post(f"/dlq/entries/{other}/replay")).status_code == 202
    again = DeadLetterCommand.model_validate_json((await next_message(commands)).body)
    assert (again.requested_by, again.api_key_id) == ("dlq-tests", command.api_key_id)


async def test_only_open_entries_with_a_shard_are_replayed_and_only_open_ones_discarded(client, db, commands) -> None:
    [discarded] = seed(db, status=DeadLetterStatus.DISCARDED)
    [no_shard] = seed(db, shard_key=None, reason="contract_violation")

    assert (await client.post(f"/dlq/entries/{discarded}/replay")).status_code == 409
    assert (await client.post(f"/dlq/entries/{discarded}/discard")).status_code == 409
    assert (await client.post(f"/dlq/entries/{no_shard}/replay")).status_code == 409
    assert (await client.post("/dlq/entries/nope/replay")).status_code == 404
    assert await drain(commands) == []

    response = await client.post(f"/dlq/entries/{no_shard}/discard", json={"note": "junk"}, headers={"X-Cairn-Actor": "bob"})
    assert response.status_code == 202
    command = DeadLetterCommand.model_validate_json((await next_message(commands)).body)
    assert (command.action, command.requested_by, command.note) == ("discard", "bob", "junk")


async def test_replay_of_everything_matching_a_filter(client, db, commands) -> None:
    open_ids = seed(db, 3, job_id="job-bulk")
    seed(db, 1, job_id="job-bulk", status=DeadLetterStatus.REPLAYED)
    seed(db, 1, job_id="job-bulk", shard_key=None)

    assert (await client.post("/dlq/replay", json={})).status_code == 422
    first = (await client.post("/dlq/replay", json={"job_id": "job-bulk", "limit": 2})).json()
    assert (first["matched"], first["published"], first["remaining"]) == (3, 2, 1)
    assert [c["dead_letter_id"] for c in first["commands"]] == open_ids[:2]  # oldest first
    sent = [DeadLetterCommand.model_validate_json(m.body) for m in await drain(commands)]
    assert [(c.action, c.dead_letter_id) for c in sent] == [("replay", i) for i in open_ids[:2]]
    assert (await client.post("/dlq/replay", json={"job_id": "job-nothing"})).json()["matched"] == 0


async def test_a_command_the_broker_does_not_confirm_is_a_503_and_nothing_is_sent(app, client, db, broker, commands) -> None:
    [entry_id] = seed(db, 2, job_id="job-503")[:1]
    healthy = app.state.dead_letters
    channel = await broker.connection.channel(publisher_confirms=True)
    await channel.close()  # the broker is gone for this publisher
    app.state.dead_letters = DeadLetterService(db=healthy.db, publisher=Publisher(channel, 1.0), payloads=healthy.payloads)
    try:
        single = await client.post(f"/dlq/entries/{entry_id}/replay")
        bulk = await client.post("/dlq/replay", json={"job_id": "job-503"})
        discard = await client.post(f"/dlq/entries/{entry_id}/discard")
    finally:
        app.state.dead_letters = healthy

    assert (single.status_code, bulk.status_code, discard.status_code) == (503, 503, 503)
    assert "not confirmed" in single.json()["detail"]
    assert await drain(commands) == []
    assert db[TASK_ERRORS].find_one({"_id": entry_id})["status"] == DeadLetterStatus.OPEN


async def test_the_original_body_is_served_inline_or_from_gridfs(app, client, db) -> None:
    [inline] = seed(db)
    big = b"\x00\x01" * 50_000
    await RawPayloads(app.state.dead_letters.db).save("dl-big.body", big, owner="dl-big", content_type="application/octet-stream")
    [stored] = seed(db, original={"body": None, "body_preview": "..", "payload_ref": {"raw_payload_id": "dl-big.body", "size": len(big)}})

    response = await client.get(f"/dlq/entries/{inline}/payload")
    assert response.status_code == 200 and response.content == b'{"job_id": "x"}'
    assert response.headers["content-type"] == "application/octet-stream"  # never the sender's type
    response = await client.get(f"/dlq/entries/{stored}/payload")
    assert response.status_code == 200 and response.content == big
    assert response.headers["content-type"] == "application/octet-stream"
    assert (await client.get("/dlq/entries/nope/payload")).status_code == 404


async def test_status_shows_retries_with_attempt_and_time_and_the_failed_shards_with_their_entries(client, db) -> None:
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    db[JOBS].insert_one(
        # As the scheduler leaves it: the status reads the job document's counts (issue 14), and
        # the shard lists only when those say there are retrying or failed shards.
        {"_id": job_id, "tenant": "default", "pipeline": "synthetic", "priority": 2, "state": JobState.RETRY, "shard_count": 3, "created_at": now,
         "counts": {"shards_failed": 1}, "shard_states": {ShardState.RETRY: 1, ShardState.FAILED: 1, ShardState.RUNNING: 1}}
    )
    retry_at_ms = int(now.timestamp() * 1000) + 4_000
    retry = {"attempt": 2, "max_attempts": 5, "delay_s": 1.5, "ceiling_s": 2.0, "error": "down", "at_ms": 0, "retry_at_ms": retry_at_ms}
    db[SHARDS].insert_many(
        [
            {"_id": f"{job_id}:0000", "shard_key": f"{job_id}:0000", "job_id": job_id, "state": ShardState.RETRY,
             "attempts": 2, "retry": retry, "retries": [retry], "last_error": "RetryableError: down"},
            {"_id": f"{job_id}:0001", "shard_key": f"{job_id}:0001", "job_id": job_id, "state": ShardState.FAILED,
             "attempts": 1, "dead_letter_id": "dl-x", "last_error": "NonRetryableError: bad"},
            {"_id": f"{job_id}:0002", "shard_key": f"{job_id}:0002", "job_id": job_id, "state": ShardState.RUNNING, "attempts": 1},
        ]
    )

    status = (await client.get(f"/task/status/{job_id}")).json()

    assert status["state"] == "RETRY" and status["shards"]["retry"] == 1 and status["shards"]["failed"] == 1
    [waiting] = status["retrying"]
    assert (waiting["shard_key"], waiting["attempt"], waiting["max_attempts"], waiting["delay_s"]) == (f"{job_id}:0000", 2, 5, 1.5)
    assert datetime.fromisoformat(waiting["next_retry_at"]) == datetime.fromtimestamp(retry_at_ms / 1000, UTC)
    assert status["failed_shards"] == [
        {"shard_key": f"{job_id}:0001", "task_error_id": "dl-x", "attempts": 1, "error": "NonRetryableError: bad", "entry_url": "/dlq/entries/dl-x"}
    ]
    assert status["dead_letters_url"] == f"/dlq/entries?job_id={job_id}"


async def test_the_dead_letter_api_is_for_admin_keys_only(app, db) -> None:
    document, reader = new_key("default", ["read", "submit"], "not-an-operator")
    db[API_KEYS].insert_one(document)
    [entry_id] = seed(db)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10) as anonymous:
        assert (await anonymous.get("/dlq/entries")).status_code == 401
        headers = {"Authorization": f"Bearer {reader}"}
        assert (await anonymous.get("/dlq/entries", headers=headers)).status_code == 403
        assert (await anonymous.post(f"/dlq/entries/{entry_id}/replay", headers=headers)).status_code == 403


async def test_a_second_command_while_one_is_pending_is_409_and_the_outcome_is_readable(app, client, db, commands, test_env) -> None:
    from cairn_dlq_handler.replay import DeadLetterCommands
    from cairn_runtime.celery_config import ShardTaskSender

    [entry_id] = seed(db)  # its shard is not recorded: the DLQ handler will refuse the replay

    first = await client.post(f"/dlq/entries/{entry_id}/replay")
    assert first.status_code == 202, first.text
    command_url = first.json()["command_url"]
    pending = (await client.get(command_url)).json()
    assert (pending["status"], pending["outcome"], pending["entry_status"]) == ("pending", None, "open")

    # The handler has not taken the first command yet: its outcome decides, the second is refused now.
    for action in ("replay", "discard"):
        second = await client.post(f"/dlq/entries/{entry_id}/{action}")
        assert second.status_code == 409, second.text
        assert first.json()["command_id"] in second.json()["detail"]
    bulk = (await client.post("/dlq/replay", json={"job_id": db[TASK_ERRORS].find_one({"_id": entry_id})["job_id"]})).json()
    assert (bulk["matched"], bulk["published"]) == (0, 0)

    # The real DLQ handler handles the command it was sent.
    [message] = await drain(commands)
    handler = DeadLetterCommands(app.state.dead_letters.db, ShardTaskSender.for_broker(test_env.amqp_url, "gateway-tests"))
    await handler.handle(DeadLetterCommand.model_validate_json(message.body))

    done = (await client.get(command_url)).json()
    assert (done["status"], done["outcome"], done["entry_status"]) == ("done", "refused", "open")
    assert "not recorded" in done["detail"] and done["finished_at"] is not None
    # Handled: the entry takes a new command again.
    assert (await client.post(f"/dlq/entries/{entry_id}/discard")).status_code == 202
    assert (await client.get("/dlq/commands/nope")).status_code == 404


async def test_replay_of_an_entry_already_replaying_is_409(client, db, commands) -> None:
    [entry_id] = seed(db, status=DeadLetterStatus.REPLAYING, replay={"command_id": "earlier"})

    response = await client.post(f"/dlq/entries/{entry_id}/replay")

    assert response.status_code == 409 and "replaying" in response.json()["detail"]
    assert await drain(commands) == []


def quota_tenant(db: Database, max_running_jobs: int, **jobs: JobState) -> str:
    """A tenant of its own with that quota and these jobs (`{suffix: state}`, ids `<tenant>-<suffix>`)."""
    tenant = f"quota-{uuid.uuid4().hex[:8]}"
    db[TENANTS].insert_one({"_id": tenant, "quotas": {"max_running_jobs": max_running_jobs}})
    db[JOBS].insert_many([{"_id": f"{tenant}-{suffix}", "tenant": tenant, "state": state} for suffix, state in jobs.items()])
    return tenant


async def test_a_replay_that_would_reopen_a_failed_job_past_the_running_jobs_quota_is_429(client_for, db, commands) -> None:
    tenant = quota_tenant(db, 1, running=JobState.STARTED, failed=JobState.FAILURE, cancelled=JobState.CANCELLED)
    client = client_for(tenant=tenant, name="dlq-quota")
    [of_failed] = seed(db, job_id=f"{tenant}-failed", tenant=tenant)
    [of_running] = seed(db, job_id=f"{tenant}-running", tenant=tenant)
    [of_cancelled] = seed(db, job_id=f"{tenant}-cancelled", tenant=tenant)

    refused = await client.post(f"/dlq/entries/{of_failed}/replay")
    bulk = await client.post("/dlq/replay", json={"job_id": f"{tenant}-failed"})

    assert refused.status_code == bulk.status_code == 429, (refused.text, bulk.text)
    assert "max_running_jobs" in refused.json()["detail"] and refused.headers["Retry-After"]
    assert await drain(commands) == []  # nothing requested
    assert "pending_command" not in db[TASK_ERRORS].find_one({"_id": of_failed})
    # Replays that reopen nothing are not counted: inside a running job; of a cancelled job (the
    # DLQ handler refuses that replay itself).
    assert (await client.post(f"/dlq/entries/{of_running}/replay")).status_code == 202
    assert (await client.post(f"/dlq/entries/{of_cancelled}/replay")).status_code == 202
    db[JOBS].update_one({"_id": f"{tenant}-running"}, {"$set": {"state": JobState.SUCCESS}})
    assert (await client.post(f"/dlq/entries/{of_failed}/replay")).status_code == 202  # room again


async def test_replays_not_handled_yet_count_against_the_quota_and_a_bulk_replay_sends_what_fits(client_for, db, commands) -> None:
    tenant = quota_tenant(db, 2, a=JobState.FAILURE, b=JobState.FAILURE, c=JobState.FAILURE)
    client = client_for(tenant=tenant, name="dlq-quota-pending")
    [of_a] = seed(db, job_id=f"{tenant}-a", tenant=tenant)
    [of_a_too, of_b_first] = [seed(db, job_id=f"{tenant}-a", tenant=tenant)[0], seed(db, job_id=f"{tenant}-b", tenant=tenant)[0]]
    [of_c] = seed(db, job_id=f"{tenant}-c", tenant=tenant)

    assert (await client.post(f"/dlq/entries/{of_a}/replay")).status_code == 202  # job a: 1 of 2, not handled yet
    assert (await client.post(f"/dlq/entries/{of_a_too}/replay")).status_code == 202  # the same job: counted once

    bulk = (await client.post("/dlq/replay", json={"reason": "retries_exhausted"})).json()

    # Room for one more job: b's entry is sent, c's is held back (and left open for later).
    assert [c["dead_letter_id"] for c in bulk["commands"]] == [of_b_first]
    assert bulk["published"] == 1 and bulk["remaining"] >= 1 and "max_running_jobs" in bulk["held_by_quota"]
    assert (await client.post(f"/dlq/entries/{of_c}/replay")).status_code == 429
    assert len(await drain(commands)) == 3
