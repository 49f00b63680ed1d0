"""Workflows through the gateway (ASGI, this run's MongoDB-wire server, RabbitMQ vhost and Redis):
`after` validated and recorded WAITING, chains recorded step by step with their derived state."""

import asyncio
import json
import uuid

import pytest

from cairn_contracts.jobs import MISSING_DEPENDENCY_GRACE_MS, JobSpec
from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState
from cairn_contracts.store import CHAINS, JOBS
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS, QUEUE_SCHEDULER_CONTROL
from cairn_gateway.jobs_schemas import ChainAccepted, ChainSpec
from cairn_testkit.aio import drain

SPEC = {"pipeline": "synthetic", "params": {"count": 100}, "sharding": {"shards": 1}}


def spec(**changes) -> dict:
    return {**SPEC, "name": f"job {uuid.uuid4().hex[:10]}", **changes}


# The gateway's settings in this module (conftest.py `settings`): no scheduler here, so the
# module's jobs never finish (no running-jobs quota) and identical specs must not be refused.
GATEWAY_SETTINGS = {"job_lock_ttl_s": 0, "tenant_max_running_jobs": None}


@pytest.fixture
def clients(client_for):
    """`clients(tenant)`: a client with a new submit/read key of `tenant`."""
    return lambda tenant: client_for(tenant, ("submit", "read"))


@pytest.fixture
async def commands(broker):
    queue = broker.queues[QUEUE_SCHEDULER_COMMANDS]
    await drain(queue)
    return queue


async def started(commands) -> list[str]:
    return [StartJob.model_validate(json.loads(m.body)).job_id for m in await drain(commands)]


async def test_a_job_with_after_is_recorded_waiting_and_its_command_published(clients, db, commands) -> None:
    acme = clients("acme")
    first = (await acme.post("/v1/jobs", json=spec())).json()["id"]

    answer = await acme.post("/v1/jobs", json=spec(after=[first], params_from={"count": "result.records_written"}, on_dependency_failure="skip"))

    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["state"] == JobState.WAITING
    stored = db[JOBS].find_one({"_id": body["id"]})
    assert (stored["state"], stored["after"], stored.get("space")) == (JobState.WAITING, [first], None)  # params come later
    assert await started(commands) == [first, body["id"]]  # the scheduler looks at it at once
    job = (await acme.get(f"/v1/jobs/{body['id']}")).json()
    assert (job["state"], job["after"], job["spec"]["on_dependency_failure"]) == ("WAITING", [first], "skip")
    assert (await acme.get("/v1/jobs", params={"state": "WAITING"})).json()["items"][0]["id"] == body["id"]


async def test_after_names_only_jobs_of_the_tenant(clients, db, commands) -> None:
    acme, globex = clients("acme"), clients("globex")
    own = (await acme.post("/v1/jobs", json=spec())).json()["id"]
    foreign = (await globex.post("/v1/jobs", json=spec())).json()["id"]
    before = db[JOBS].count_documents({})

    answer = await acme.post("/v1/jobs", json=spec(after=[own, foreign, "0" * 32]))

    assert answer.status_code == 422
    assert [(e["loc"], e["type"]) for e in answer.json()["detail"]] == [
        (["body", "after", 1], "unknown_dependency"), (["body", "after", 2], "unknown_dependency"),
    ]
    assert db[JOBS].count_documents({}) == before  # nothing recorded


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (spec(after=["a", "a"]), ["body", "after", 1]),
        (spec(params_from={"count": "result.records_written"}), ["body", "params_from"]),
        (spec(after=["a"], params_from={"count": "somewhere.else"}), ["body", "params_from", "count"]),
        (spec(after=["a"], on_dependency_failure="retry"), ["body", "on_dependency_failure"]),
    ],
)
async def test_bad_workflow_fields_are_a_422_naming_the_field(clients, body, loc) -> None:
    answer = await clients("acme").post("/v1/jobs", json=body)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == loc


async def test_a_chain_records_its_steps_each_waiting_for_the_previous(clients, db, commands) -> None:
    acme = clients("acme")
    body = {
        "name": "etl",
        "steps": [spec(), spec(params_from={"count": "result.records_written"}), spec(params_from={"count": "result.records_done"})],
    }

    answer = await acme.post("/v1/chains", json=body, headers={"Idempotency-Key": "etl-1"})

    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    ids = accepted["job_ids"]
    assert len(ids) == 3 and answer.headers["Location"] == f"/v1/chains/{accepted['id']}"
    steps = [db[JOBS].find_one({"_id": job_id}) for job_id in ids]
    assert [s["state"] for s in steps] == ["PENDING", "WAITING", "WAITING"]
    assert [s.get("after") for s in steps] == [None, [ids[0]], [ids[1]]]
    assert [(s["chain_id"], s["chain_step"]) for s in steps] == [(accepted["id"], i) for i in range(3)]
    assert await started(commands) == [ids[0]]

    chain = (await acme.get(accepted["url"])).json()
    assert (chain["name"], chain["state"], chain["current_step"]) == ("etl", "PENDING", 0)
    assert [s["job"]["id"] for s in chain["steps"]] == ids

    again = await acme.post("/v1/chains", json=body, headers={"Idempotency-Key": "etl-1"})
    assert (again.status_code, again.json()["id"], again.json()["created"]) == (202, accepted["id"], False)
    assert db[JOBS].count_documents({"chain_id": accepted["id"]}) == 3
    assert (await acme.post("/v1/chains", json={"steps": [spec()]}, headers={"Idempotency-Key": "etl-1"})).status_code == 409

    db[JOBS].update_one({"_id": ids[0]}, {"$set": {"state": "SUCCESS"}})
    db[JOBS].update_one({"_id": ids[1]}, {"$set": {"state": "FAILURE"}})
    chain = (await acme.get(accepted["url"])).json()
    assert (chain["state"], chain["current_step"]) == ("FAILURE", 1)
    assert (await clients("globex").get(accepted["url"])).status_code == 404
    assert (await acme.get("/v1/chains")).json()["items"][0]["id"] == accepted["id"]


async def test_chain_steps_are_checked_where_they_are(clients, db) -> None:
    acme = clients("acme")
    before = db[CHAINS].count_documents({})
    bad_params = await acme.post("/v1/chains", json={"steps": [spec(), spec(params={"count": -1})]})
    assert bad_params.status_code == 422 and bad_params.json()["detail"][0]["loc"][:4] == ["body", "steps", 1, "params"]
    first_reads = await acme.post("/v1/chains", json={"steps": [spec(params_from={"count": "result.records_written"})]})
    assert first_reads.status_code == 422 and first_reads.json()["detail"][0]["loc"] == ["body", "steps", 0, "params_from"]
    assert db[CHAINS].count_documents({}) == before


async def test_a_schedule_job_cannot_wait_for_jobs(clients) -> None:
    answer = await clients("acme").post(
        "/v1/schedules", json={"kind": "interval", "interval_s": 60, "job": spec(after=["a"])}
    )
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "job", "after"]


async def test_cancelling_a_chain_cancels_its_unfinished_steps(clients, db, broker) -> None:
    acme = clients("acme")
    accepted = (await acme.post("/v1/chains", json={"steps": [spec(), spec(), spec()]})).json()
    ids = accepted["job_ids"]
    db[JOBS].update_one({"_id": ids[0]}, {"$set": {"state": "SUCCESS"}})
    control = broker.queues[QUEUE_SCHEDULER_CONTROL]
    await drain(control)

    answer = await acme.post(f"{accepted['url']}/cancel")

    assert answer.status_code == 202, answer.text
    assert [s["job"]["cancel_requested"] for s in answer.json()["steps"]] == [False, True, True]
    # Last step first: no step is ended FAILURE by its predecessor's cancel before its own mark.
    assert [json.loads(m.body)["job_id"] for m in await drain(control)] == ids[:0:-1]
    assert (await acme.post("/v1/chains/nope/cancel")).status_code == 404



async def test_a_chain_step_whose_after_overflows_with_the_previous_step_is_a_422(clients, db) -> None:
    # Step 1 waits for step 0 plus its own `after`: 100 ids of its own make 101, over the limit.
    acme = clients("acme")
    ids = [record["_id"] for record in db[JOBS].find({"tenant": "acme"}, {"_id": 1}).limit(100)]
    ids += [(await acme.post("/v1/jobs", json=spec())).json()["id"] for _ in range(100 - len(ids))]
    before = db[CHAINS].count_documents({})

    answer = await acme.post("/v1/chains", json={"steps": [spec(), spec(after=ids)]})

    assert answer.status_code == 422, answer.text
    assert (answer.json()["detail"][0]["loc"], answer.json()["detail"][0]["type"]) == (["body", "steps", 1, "after"], "too_long")
    assert db[CHAINS].count_documents({}) == before



async def test_the_gateways_publish_mark_does_not_hide_a_released_jobs_command_from_the_relay(app, clients, db, commands) -> None:
    # The gateway's StartJob of a WAITING job is consumed, the scheduler releases the job (PENDING,
    # `command_published_at` reset) and dies before publishing; the gateway marks its own command
    # only then. The relay (PENDING, command_published_at null) must still see the job.
    acme = clients("acme")
    first = (await acme.post("/v1/jobs", json=spec())).json()["id"]
    body = spec(after=[first])
    waiting = (await acme.post("/v1/jobs", json=body)).json()["id"]
    db[JOBS].update_one({"_id": waiting}, {"$set": {"state": "PENDING", "released_at_ms": 1, "command_published_at": None}})

    await app.state.jobs.publish_start(waiting, "acme", JobSpec.model_validate(body))

    assert db[JOBS].find_one({"_id": waiting})["command_published_at"] is None
    assert db[JOBS].find_one({"_id": first})["command_published_at"] is not None  # an ordinary job is marked


async def test_a_chain_whose_steps_are_deleted_or_missing_reads_from_the_recorded_ones(clients, db) -> None:
    acme = clients("acme")
    done = (await acme.post("/v1/chains", json={"steps": [spec(), spec()]})).json()
    for job_id in done["job_ids"]:
        db[JOBS].update_one({"_id": job_id}, {"$set": {"state": "SUCCESS"}})
    assert (await acme.delete(f"/v1/jobs/{done['job_ids'][0]}")).status_code == 204  # a finished step, deleted

    chain = (await acme.get(done["url"])).json()
    assert (chain["state"], chain["current_step"], len(chain["steps"])) == ("SUCCESS", None, 1)

    # A half-recorded chain: step 0 never recorded, step 1 ended FAILURE by the dependency sweep.
    half = (await acme.post("/v1/chains", json={"steps": [spec(), spec()]})).json()
    db[JOBS].delete_one({"_id": half["job_ids"][0]})
    db[JOBS].update_one({"_id": half["job_ids"][1]}, {"$set": {"state": "FAILURE"}})
    chain = (await acme.get(half["url"])).json()
    assert (chain["state"], chain["current_step"]) == ("FAILURE", 1)

    # No step recorded at all (the gateway died right after the chain document): WAITING while it
    # may still be recorded, then FAILURE saying so, not WAITING forever.
    empty = (await acme.post("/v1/chains", json={"steps": [spec(), spec()]})).json()
    db[JOBS].delete_many({"_id": {"$in": empty["job_ids"]}})
    assert (await acme.get(empty["url"])).json()["state"] == "WAITING"
    db[CHAINS].update_one({"_id": empty["id"]}, {"$inc": {"created_at_ms": -MISSING_DEPENDENCY_GRACE_MS - 1000}})
    chain = (await acme.get(empty["url"])).json()
    assert (chain["state"], chain["current_step"], chain["steps"]) == ("FAILURE", 0, [])
    assert "Idempotency-Key" in chain["detail"]



async def test_concurrent_chains_under_one_idempotency_key_with_other_bodies_are_one_202_and_one_409(app, db) -> None:
    # Both requests pass the early key check (no chain yet); the one that loses the insert must
    # compare bodies too, not complete the winner's chain with its own steps and answer 202.
    key = f"race-{uuid.uuid4().hex}"
    bodies = [ChainSpec.model_validate({"name": "one", "steps": [spec(), spec()]}), ChainSpec.model_validate({"name": "two", "steps": [spec()]})]

    answers = await asyncio.gather(*(app.state.chains.submit(body, "acme", key) for body in bodies), return_exceptions=True)

    assert sorted(type(a).__name__ for a in answers) == ["ChainAccepted", "ChainIdempotencyConflict"], answers
    (accepted,) = [a for a in answers if isinstance(a, ChainAccepted)]
    winner = bodies[answers.index(accepted)]
    assert sorted(s["name"] for s in db[JOBS].find({"chain_id": accepted.id})) == sorted(s.name for s in winner.steps)
