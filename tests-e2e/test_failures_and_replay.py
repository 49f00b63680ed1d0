"""Issue 4 acceptance: retries with backoff, the dead-letter queue, inspect and replay.

All against the shared `system` (CAIRN_MAX_ATTEMPTS=3, backoff base 0.2 s, max 2 s). A non-retryable
error going straight to the DLQ with attempts == 1 is covered by test_walking_skeleton.py; here it
is checked again under a job policy that would allow retries.
"""

import asyncio
import base64
import hashlib
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from cairn_contracts.messages import DeadLetter, OriginalMessage
from cairn_contracts.tasks import TASK_RUN_SHARD
from cairn_contracts.topology import EXCHANGE_DLX, EXCHANGE_TASKS, QUEUE_DLQ, QUEUE_INGEST, ROUTING_INGEST
from cairn_runtime.amqp import Publisher, connect
from cairn_runtime.celery_config import celery_config
from harness import System, dump

BASE_DELAY_S, MAX_DELAY_S, MAX_ATTEMPTS = 0.2, 2.0, 3  # the harness's settings


def entry_of(system: System, job_id: str) -> dict:
    return system.wait_for(
        lambda: system.db.task_errors.find_one({"job_id": job_id}), f"the dead letter of job {job_id}"
    )


def api(system: System, method: str, path: str, **kwargs: Any) -> Any:
    with system.client() as client:
        return client.request(method, path, **kwargs)


def replay(system: System, entry_id: str, actor: str = "e2e-operator") -> Any:
    return api(system, "POST", f"/dlq/entries/{entry_id}/replay", headers={"X-Cairn-Actor": actor})


def settled_entry(system: System, entry_id: str, status: str = "replayed") -> dict:
    return system.wait_for(
        lambda: system.db.task_errors.find_one({"_id": entry_id, "status": status}), f"entry {entry_id} {status}"
    )


def checkpoints(system: System, job_id: str) -> dict[str, dict]:
    return {c["shard_key"]: c for c in system.db.checkpoints.find({"job_id": job_id})}


def assert_stored_once(system: System, job_id: str, collection: str, total: int) -> None:
    assert system.records(collection).count_documents({"job_id": job_id}) == total
    marks = list(checkpoints(system, job_id).values())
    assert sum(c["records_written"] for c in marks) == total, dump(marks)
    assert sum(c["records_redone"] for c in marks) == 0, dump(marks)
    result = api(system, "GET", f"/task/result/{job_id}").json()["result"]
    assert result["records_written"] == total and result["records_redone"] == 0, dump(result)


# --- retries -------------------------------------------------------------------------------------


def test_a_source_failing_three_times_then_recovering_succeeds_after_three_backed_off_retries(system: System) -> None:
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 3000, "fail_at_key": 1700, "failure": "retryable", "fail_times": 3},
            "batch_size": 500,
            # Beyond the worker's CAIRN_MAX_ATTEMPTS=3: the job's own policy decides.
            "retry": {"max_attempts": 4},
            "target_collection": "e2e_transient",
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    assert final["state"] == "SUCCESS", dump(final)

    shard = system.db.shards.find_one({"job_id": job_id})
    assert shard["attempts"] == 4, dump(shard)
    retries = shard["retries"]
    assert [r["attempt"] for r in retries] == [1, 2, 3], dump(retries)
    ceilings = [r["ceiling_s"] for r in retries]
    assert ceilings == [min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (n - 1)) for n in (1, 2, 3)]
    assert ceilings == sorted(ceilings) and len(set(ceilings)) == 3, "the backoff ceiling did not grow"
    for record in retries:
        assert 0 <= record["delay_s"] <= record["ceiling_s"], dump(record)
        assert record["max_attempts"] == 4
        assert "1700" in record["error"]
        assert record["retry_at_ms"] >= record["at_ms"]
    # Each retry resumed from the checkpoint: nothing before key 1700 was stored twice.
    assert_stored_once(system, job_id, "e2e_transient", 3000)
    assert system.db.task_errors.count_documents({"job_id": job_id}) == 0


def test_a_source_failing_until_fixed_is_dead_lettered_then_a_replay_completes_the_job_from_its_checkpoint(
    system: System,
) -> None:
    # The source fails until it is fixed: the test pipeline of tests-e2e/flaky_source.py.
    source = f"source-down-{uuid.uuid4().hex[:8]}"
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 4000, "fail_at_key": 3300, "failure": "retryable", "key_prefix": source},
            "sharding": {"shards": 2},
            "batch_size": 500,
            "target_collection": "e2e_fixed",
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)
    assert final["state"] == "FAILURE", dump(final)
    failed_key = f"{job_id}:0001"
    shard = system.db.shards.find_one({"_id": failed_key})
    assert shard["state"] == "FAILED" and shard["attempts"] == MAX_ATTEMPTS, dump(shard)
    assert [r["attempt"] for r in shard["retries"]] == [1, 2]

    entry = entry_of(system, job_id)
    assert entry["reason"] == "retries_exhausted" and entry["attempts"] == MAX_ATTEMPTS
    assert entry["shard_key"] == failed_key and entry["pipeline"] == "synthetic" and entry["status"] == "open"
    assert entry["_id"] == shard["dead_letter_id"]

    # The status says FAILURE, which shard failed, and which task_errors entry to look at.
    status = system.status(job_id)
    assert [f["shard_key"] for f in status["failed_shards"]] == [failed_key]
    assert status["failed_shards"][0]["task_error_id"] == entry["_id"]
    assert status["dead_letters_url"] == f"/dlq/entries?job_id={job_id}"
    listed = api(system, "GET", "/dlq/entries", params={"job_id": job_id}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == entry["_id"] and listed["items"][0]["replayable"]

    # Two batches of the failing shard were stored before key 3300: [2000, 3000).
    before = checkpoints(system, job_id)[failed_key]
    assert before["cursor"] == 3000 and before["records_written"] == 1000, dump(before)

    system.records("fixed_sources").insert_one({"_id": source})  # "fix the source" (flaky_source.py)
    response = replay(system, entry["_id"], actor="alice")
    assert response.status_code == 202, response.text
    assert response.json()["dead_letter_id"] == entry["_id"]

    final = system.wait_for_state(job_id, {"SUCCESS"}, timeout_s=120)
    assert final["failed_shards"] == [] and final["shards"]["succeeded"] == 2
    after = checkpoints(system, job_id)[failed_key]
    assert after["records_written"] == 2000 and after["records_redone"] == 0, dump(after)
    assert_stored_once(system, job_id, "e2e_fixed", 4000)

    shard = system.db.shards.find_one({"_id": failed_key})
    assert shard["attempts"] == 1 and shard["replays"] == 1 and shard["attempts_before_replays"] == MAX_ATTEMPTS
    entry = settled_entry(system, entry["_id"])
    assert entry["replay"]["outcome"] == "succeeded" and entry["replay"]["requested_by"] == "alice"
    assert [r["outcome"] for r in entry["replays"]] == ["succeeded"]
    shown = api(system, "GET", f"/dlq/entries/{entry['_id']}").json()
    assert shown["status"] == "replayed" and shown["replay"]["requested_by"] == "alice" and not shown["replayable"]


# --- the dead-letter queue --------------------------------------------------------------------------


def test_a_non_retryable_error_is_not_retried_even_when_the_job_allows_retries_and_discard_keeps_it(
    system: System,
) -> None:
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 1000, "fail_at_key": 10, "failure": "non_retryable"},
            "retry": {"max_attempts": 5},
            "target_collection": "e2e_permanent",
        }
    )
    assert system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "FAILURE"
    assert system.db.shards.find_one({"job_id": job_id})["attempts"] == 1
    entry = entry_of(system, job_id)
    assert entry["reason"] == "non_retryable" and entry["attempts"] == 1

    response = api(
        system,
        "POST",
        f"/dlq/entries/{entry['_id']}/discard",
        json={"note": "bad input, won't fix"},
        headers={"X-Cairn-Actor": "bob"},
    )
    assert response.status_code == 202, response.text
    entry = settled_entry(system, entry["_id"], status="discarded")
    assert entry["discard"]["requested_by"] == "bob" and entry["discard"]["note"] == "bad input, won't fix"
    assert system.db.task_errors.count_documents({"job_id": job_id}) == 1, "a discarded entry is kept"
    assert replay(system, entry["_id"]).status_code == 409
    assert api(system, "POST", f"/dlq/entries/{entry['_id']}/discard").status_code == 409
    assert api(system, "GET", "/dlq/entries/no-such-entry").status_code == 404
    assert replay(system, "no-such-entry").status_code == 404
    discarded = api(system, "GET", "/dlq/entries", params={"job_id": job_id, "status": "discarded"}).json()
    assert [item["id"] for item in discarded["items"]] == [entry["_id"]]
    assert system.status(job_id)["state"] == "FAILURE"


def test_replaying_the_same_entry_twice_at_once_runs_the_shard_once(system: System) -> None:
    source = f"source-down-{uuid.uuid4().hex[:8]}"  # fails until fixed (tests-e2e/flaky_source.py)
    job_id = system.start_job(
        {
            "pipeline": "synthetic",
            "params": {"count": 2000, "fail_at_key": 1200, "failure": "non_retryable", "key_prefix": source},
            "batch_size": 500,
            "target_collection": "e2e_twice_replayed",
        }
    )
    assert system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "FAILURE"
    entry = entry_of(system, job_id)
    system.records("fixed_sources").insert_one({"_id": source})

    barrier = threading.Barrier(2)
    codes: list[int] = []

    def request() -> None:
        barrier.wait()
        codes.append(replay(system, entry["_id"]).status_code)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 202 in codes and set(codes) <= {202, 409}, codes

    assert system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "SUCCESS"
    entry = settled_entry(system, entry["_id"])
    # Every accepted command was handled: one replay ran, the other was refused.
    system.wait_for(
        lambda: system.db.task_errors.find_one({"_id": entry["_id"]}).get("replays_refused", 0) == codes.count(202) - 1,
        "the refusal",
    )
    entry = system.db.task_errors.find_one({"_id": entry["_id"]})
    assert len(entry["replays"]) == 1 and entry["replay"]["dispatches"] == 1, dump(entry)
    shard = system.db.shards.find_one({"job_id": job_id})
    assert shard["replays"] == 1 and shard["attempts"] == 1, dump(shard)
    assert_stored_once(system, job_id, "e2e_twice_replayed", 2000)


def test_messages_that_are_not_valid_contracts_are_dead_lettered_and_the_worker_keeps_running(system: System) -> None:
    marker = uuid.uuid4().hex
    sender = Celery("e2e-bad-sender")
    sender.conf.update(celery_config(system.amqp_url))
    try:
        bad_kwargs_id = sender.send_task(TASK_RUN_SHARD, kwargs={"job_id": 42, "shard": marker}).id
        unknown_task_id = sender.send_task("cairn.ingest.no_such_task", kwargs={"marker": marker}).id
    finally:
        sender.close()

    async def publish_raw() -> None:
        connection = await connect(system.amqp_url, "e2e-raw")
        try:
            publisher = await Publisher.open(connection, timeout_s=10)
            for body, content_type in (
                (f"not a task at all {marker}".encode(), "text/plain"),
                (json.dumps({"hello": marker}).encode(), "application/json"),
                (b"{broken json " + marker.encode(), "application/json"),
            ):
                await publisher.publish_bytes(
                    EXCHANGE_TASKS, ROUTING_INGEST, body, headers={}, content_type=content_type
                )
        finally:
            await connection.close()

    asyncio.run(publish_raw())

    def ours() -> list[dict]:
        found = []
        for entry in system.db.task_errors.find({"reason": "contract_violation", "source_queue": QUEUE_INGEST}):
            original = entry.get("original") or {}
            if marker in json.dumps(original):
                found.append(entry)
        return found

    entries = system.wait_for(
        lambda: (found := ours()) and len(found) == 5 and found, "5 contract violations", timeout_s=60
    )
    by_type = sorted(e["error_type"] for e in entries)
    assert by_type == ["UnreadableMessage"] * 4 + ["ValidationError"], dump(entries)
    invalid_kwargs = next(e for e in entries if e["error_type"] == "ValidationError")
    assert bad_kwargs_id in invalid_kwargs["original"]["body"] and "job_id" in invalid_kwargs["error_message"]
    unknown = [e for e in entries if unknown_task_id in json.dumps(e["original"])]
    assert len(unknown) == 1 and "no_such_task" in unknown[0]["error_message"]
    assert all(e["status"] == "open" and not e.get("shard_key") for e in entries)
    system.wait_until_drained(QUEUE_INGEST)  # every one of them was taken off the queue (acked)

    # The worker is alive and still runs jobs.
    assert system.services["ingest_worker"].process.poll() is None
    job_id = system.start_job({"pipeline": "synthetic", "params": {"count": 500}, "target_collection": "e2e_after_bad"})
    assert system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)["state"] == "SUCCESS"


def test_list_filters_and_pages_of_dead_letters(system: System) -> None:
    error_type = f"FilterProbe{uuid.uuid4().hex[:6]}"
    before = datetime.now(UTC) - timedelta(seconds=1)
    ids = [f"probe-{uuid.uuid4().hex}" for _ in range(5)]

    async def publish() -> None:
        connection = await connect(system.amqp_url, "e2e-probe")
        try:
            publisher = await Publisher.open(connection, timeout_s=10)
            for index, letter_id in enumerate(ids):
                letter = DeadLetter(
                    dead_letter_id=letter_id,
                    source_service="e2e",
                    source_queue=QUEUE_INGEST,
                    reason="poison" if index < 2 else "non_retryable",
                    error_type=error_type,
                    error_message=f"probe {index}",
                    job_id=f"probe-job-{index % 2}",
                    shard_key=f"probe-job-{index % 2}:0000",
                    attempts=index,
                    original=OriginalMessage(body="{}"),
                )
                await publisher.publish(letter)
                await asyncio.sleep(0.01)  # distinct created_at, so the order is defined
        finally:
            await connection.close()

    asyncio.run(publish())
    system.wait_for(lambda: system.db.task_errors.count_documents({"error_type": error_type}) == 5, "5 probes recorded")
    after = datetime.now(UTC) + timedelta(seconds=1)

    def listed(**params: Any) -> dict:
        response = api(system, "GET", "/dlq/entries", params={"error_type": error_type, **params})
        assert response.status_code == 200, response.text
        return response.json()

    everything = listed()
    assert everything["total"] == 5 and {i["id"] for i in everything["items"]} == set(ids)
    assert [i["id"] for i in everything["items"]] == list(reversed(ids)), "newest first"
    assert {i["id"] for i in listed(reason="poison")["items"]} == set(ids[:2])
    assert {i["id"] for i in listed(job_id="probe-job-1")["items"]} == {ids[1], ids[3]}
    assert {i["id"] for i in listed(job_id="probe-job-1", reason="poison")["items"]} == {ids[1]}
    assert listed(status="open")["total"] == 5 and listed(status="discarded")["total"] == 0
    assert listed(pipeline="synthetic")["total"] == 0, "probe jobs are not recorded jobs: no pipeline"
    assert listed(since=before.isoformat(), until=after.isoformat())["total"] == 5
    assert listed(until=before.isoformat())["total"] == 0
    assert listed(since=after.isoformat())["total"] == 0

    pages, offset = [], 0
    while offset is not None:
        page = listed(limit=2, offset=offset)
        pages.append([i["id"] for i in page["items"]])
        offset = page["next_offset"]
    assert [len(p) for p in pages] == [2, 2, 1] and sum(pages, []) == list(reversed(ids))
    assert api(system, "GET", "/dlq/entries", params={"status": "bogus"}).status_code == 422
    assert api(system, "POST", "/dlq/replay", json={}).status_code == 422

    # Replay all matching a filter: the probes name shards that do not exist, so each replay is
    # refused by the DLQ handler and the entries go back to open.
    accepted = api(system, "POST", "/dlq/replay", json={"error_type": error_type, "reason": "poison"}).json()
    assert accepted["matched"] == 2 and accepted["published"] == 2 and accepted["remaining"] == 0
    assert {c["dead_letter_id"] for c in accepted["commands"]} == set(ids[:2])
    for letter_id in ids[:2]:
        entry = system.wait_for(
            lambda letter_id=letter_id: (e := system.db.task_errors.find_one({"_id": letter_id})) and e.get("replays") and e,
            f"replay of {letter_id} handled",
        )
        assert entry["status"] == "open" and entry["replays"][0]["outcome"] == "refused", dump(entry)


# --- the DLQ handler under SIGKILL ------------------------------------------------------------------


def test_every_dead_letter_is_recorded_exactly_once_when_the_dlq_handler_is_killed_while_recording(
    system: System,
) -> None:
    marker = uuid.uuid4().hex
    envelopes = [f"kill-{marker}-{i}" for i in range(1200)]
    large = {envelopes[i]: (f"{i}:" + "x" * (80 * 1024)).encode() for i in range(0, 1200, 100)}  # 12 bodies > 64 KiB
    raw_bodies = [json.dumps({"raw": marker, "n": i}).encode() for i in range(200)]

    dlq_handler = system.services["dlq_handler"]
    dlq_handler.kill()  # a backlog first, so the kill below lands mid-way through it

    async def publish() -> None:
        connection = await connect(system.amqp_url, "e2e-dlq-kill")
        try:
            publisher = await Publisher.open(connection, timeout_s=10)
            for letter_id in envelopes:
                body = large.get(letter_id)
                original = OriginalMessage(
                    body=base64.b64encode(body).decode() if body else "{}", body_encoding="base64" if body else "utf-8"
                )
                letter = DeadLetter(
                    dead_letter_id=letter_id,
                    source_service="e2e",
                    source_queue=QUEUE_INGEST,
                    reason="poison",
                    error_type="KillProbe",
                    error_message=marker,
                    original=original,
                )
                await publisher.publish(letter)
            for index, body in enumerate(raw_bodies):  # as the broker would dead-letter them, minus x-death
                await publisher.publish_bytes(
                    EXCHANGE_DLX, QUEUE_INGEST, body, headers={}, message_id=f"{marker}-{index}"
                )
        finally:
            await connection.close()

    asyncio.run(publish())
    total = len(envelopes) + len(raw_bodies)
    assert system.queue_depth(QUEUE_DLQ) >= total

    dlq_handler.start()
    recorded = lambda: system.db.task_errors.count_documents({"error_message": marker})  # noqa: E731
    system.wait_for(lambda: recorded() >= 50, "the restarted handler to record some", timeout_s=60)
    dlq_handler.kill()
    at_kill = recorded()
    assert at_kill < len(envelopes), "the handler finished before it could be killed mid-way"

    dlq_handler.start()
    system.wait_until_drained(QUEUE_DLQ, timeout_s=180)

    # Each envelope recorded once, under its own id.
    assert system.db.task_errors.count_documents({"_id": {"$in": envelopes}}) == len(envelopes)
    assert recorded() == len(envelopes)
    # Each broker-style dead letter recorded once (its id is derived from the message).
    raw = [e for e in system.db.task_errors.find({"kind": "broker"}) if marker in json.dumps(e.get("original"))]
    assert sorted(json.loads(e["original"]["body"])["n"] for e in raw) == list(range(len(raw_bodies)))
    # Large bodies went to GridFS once each, with a pointer in the entry.
    for letter_id, body in large.items():
        entry = system.db.task_errors.find_one({"_id": letter_id})
        ref = entry["original"]["payload_ref"]
        assert entry["original"]["body"] is None and ref["size"] == len(body)
        assert ref["sha256"] == hashlib.sha256(body).hexdigest()
        assert system.db.raw_payloads.count_documents({"task_error_id": letter_id}) == 1
    sample = next(iter(large))
    response = api(system, "GET", f"/dlq/entries/{sample}/payload")
    assert response.status_code == 200 and response.content == large[sample]
    assert dlq_handler.process.poll() is None
