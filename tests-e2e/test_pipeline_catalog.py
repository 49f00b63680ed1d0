"""Issue 13 acceptance: a pipeline package installed into the worker (examples/, discovered by its
`cairn.pipelines` entry point) is announced to the catalog at the worker's start-up; the gateway
checks a job's params against the announced schema (a wrong param is a 422 naming the field)
and the job runs through gateway → scheduler → worker with no code of the pipeline in Cairn."""

import pytest

from harness import System, dump


def test_the_worker_announces_the_installed_example_pipeline(system: System) -> None:
    entry = system.db.pipelines.find_one({"_id": "example_orders"})

    assert entry is not None and entry["announced_by"] == "worker-1"
    with system.client() as client:
        listed = {p["name"]: p for p in client.get("/v1/pipelines").json()["items"]}
    assert {"synthetic", "mongo_range", "example_orders"} <= set(listed)
    assert listed["example_orders"]["params_schema"]["required"] == ["shop", "last_order"]
    assert listed["example_orders"]["space"][0]["start_field"] == "first_order"


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"shop": "acme", "last_order": 100, "currency": "JPY"}, ["body", "params", "currency"]),
        ({"last_order": 100}, ["body", "params", "shop"]),
        ({"shop": "acme", "last_order": 100, "discount": 5}, ["body", "params", "discount"]),
        ({"shop": "acme", "first_order": 50, "last_order": 10}, ["body", "params", "last_order"]),
    ],
    ids=["bad-currency", "missing-shop", "unknown-param", "empty-range"],
)
def test_a_wrong_param_of_the_example_pipeline_is_a_422_naming_the_field(system: System, params: dict, loc: list) -> None:
    jobs_before = system.db.jobs.count_documents({})
    with system.client() as client:
        response = client.post("/v1/jobs", json={"pipeline": "example_orders", "params": params})

    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [loc]
    assert system.db.jobs.count_documents({}) == jobs_before


def test_an_unannounced_pipeline_is_a_422_listing_the_announced_ones(system: System) -> None:
    with system.client() as client:
        response = client.post("/v1/jobs", json={"pipeline": "example_invoices", "params": {}})

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "pipeline"] and "example_orders" in error["msg"]


def test_a_job_of_the_example_pipeline_runs_through_the_gateway(system: System) -> None:
    job_id = system.start_job(
        {
            "pipeline": "example_orders",
            "params": {"shop": "e2e-shop", "first_order": 1, "last_order": 901, "currency": "GBP"},
            "sharding": {"strategy": "range", "shards": 3},
            "batch_size": 100,
            "target_collection": "example_orders",
        }
    )

    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE"}, timeout_s=120)

    assert final["state"] == "SUCCESS", dump(final) + system.logs()
    job = system.db.jobs.find_one({"_id": job_id})
    assert (job["pipeline_version"], job["space"]["start"], job["space"]["end"]) == ("1", 1, 901)
    stored = system.records("example_orders")
    assert stored.count_documents({"shop": "e2e-shop"}) == 900
    assert stored.find_one({"_id": "e2e-shop:450"})["currency"] == "GBP"  # the pipeline's identity and clean
