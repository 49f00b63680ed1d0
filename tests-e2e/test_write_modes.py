"""Issue 13, Sinks: write modes end to end (gateway -> scheduler -> worker -> MongoDB).

A mongo_range job re-run after 10 of its source records changed updates exactly those 10 with
`upsert` and reports updated=10, unchanged=the rest; `replace_window` removes the records whose
source is gone once the re-run succeeds. Counters are checked in the job's result, its status,
GET /v1/jobs/{id} and the worker's Prometheus counters.
"""

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import System, dump


def stored_counter(system: System, outcome: str) -> float:
    """The worker's cairn_records_stored_total of mongo_range jobs for `outcome`."""
    total = 0.0
    for family in text_string_to_metric_families(system.metrics_text("ingest_worker")):
        for sample in family.samples:
            if sample.name == "cairn_records_stored_total" and sample.labels == {"pipeline": "mongo_range", "outcome": outcome}:
                total += sample.value
    return total


def copy_job(system: System, name: str, source: str, target: str, mode: str, end: int) -> dict[str, Any]:
    """Run a mongo_range copy of `source` keys [0, end) into `target` to its end; its final status."""
    job_id = system.start_job(
        {
            "name": name,  # the names differ: a re-run is not refused as a duplicate of the first run
            "pipeline": "mongo_range",
            "params": {"collection": source, "key_field": "n", "start": 0, "end": end},
            "sharding": {"shards": 2},
            "batch_size": 40,
            "target_collection": target,
            "write_mode": mode,
        }
    )
    final = system.wait_for_state(job_id, {"SUCCESS", "FAILURE", "CANCELLED"}, timeout_s=180)
    assert final["state"] == "SUCCESS", dump(final)
    return final


def result_of(system: System, job_id: str) -> dict[str, Any]:
    with system.client() as client:
        response = client.get(f"/task/result/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()["result"]


def writes_of(system: System, job_id: str) -> dict[str, Any]:
    with system.client() as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()["writes"]


def test_an_upsert_rerun_updates_exactly_the_changed_records(system: System) -> None:
    source, target = system.records("e2e_wm_upsert_source"), system.records("e2e_wm_upsert")
    source.insert_many([{"_id": f"doc-{i}", "n": i, "name": f"item {i}"} for i in range(200)])

    first = copy_job(system, "upsert run 1", source.name, target.name, "upsert", 200)
    assert first["writes"] == {"inserted": 200, "updated": 0, "unchanged": 0, "duplicate": 0, "deleted": None}, dump(first)
    before = {d["_id"]: d for d in target.find()}
    changed = list(range(5, 200, 20))  # 10 source records change
    for n in changed:
        source.update_one({"n": n}, {"$set": {"name": f"item {n} (renamed)"}})
    updated_before, unchanged_before = stored_counter(system, "updated"), stored_counter(system, "unchanged")

    second = copy_job(system, "upsert run 2", source.name, target.name, "upsert", 200)

    job_id = second["task_id"]
    expected = {"inserted": 0, "updated": 10, "unchanged": 190, "duplicate": 0, "deleted": None}
    assert second["writes"] == expected, dump(second)
    assert writes_of(system, job_id) == expected
    result = result_of(system, job_id)
    assert (result["records_inserted"], result["records_updated"], result["records_unchanged"], result["records_duplicate"]) == (0, 10, 190, 0)
    assert result["records_written"] == 10, dump(result)
    after = {d["_id"]: d for d in target.find()}
    assert len(after) == 200
    rewritten = {key for key, record in after.items() if record["job_id"] == job_id}
    assert rewritten == {f"{source.name}:{n}" for n in changed}, dump(sorted(rewritten))
    for n in changed:
        assert after[f"{source.name}:{n}"]["name"] == f"item {n} (renamed)"
    for key in after.keys() - rewritten:
        assert after[key] == before[key], dump(after[key])  # not rewritten: same version, same write time
    assert stored_counter(system, "updated") - updated_before == 10
    assert stored_counter(system, "unchanged") - unchanged_before == 190


def test_a_replace_window_rerun_removes_the_records_whose_source_is_gone(system: System) -> None:
    source, target = system.records("e2e_wm_window_source"), system.records("e2e_wm_window")
    source.insert_many([{"_id": f"doc-{i}", "n": i, "name": f"item {i}"} for i in range(100)])
    target.insert_one({"_id": "written by someone else", "n": -1})  # outside the window: kept

    first = copy_job(system, "refresh 1", source.name, target.name, "replace_window", 100)
    assert first["writes"]["inserted"] == 100 and first["writes"]["deleted"] == 0, dump(first)
    gone = list(range(0, 100, 10))  # 10 source records deleted
    source.delete_many({"n": {"$in": gone}})
    source.update_many({"n": {"$in": [1, 2, 3, 4, 5]}}, {"$set": {"name": "changed"}})

    second = copy_job(system, "refresh 2", source.name, target.name, "replace_window", 100)

    assert second["writes"] == {"inserted": 0, "updated": 5, "unchanged": 85, "duplicate": 0, "deleted": 10}, dump(second)
    assert result_of(system, second["task_id"])["records_deleted"] == 10
    kept = {d["_id"] for d in target.find()}
    assert kept == {"written by someone else"} | {f"{source.name}:{n}" for n in range(100) if n not in gone}, dump(sorted(kept))
    assert target.count_documents({"name": "changed"}) == 5


def test_an_unknown_write_mode_is_refused_naming_the_field(system: System) -> None:
    with system.client() as client:
        response = client.post("/task/start", json={"pipeline": "synthetic", "params": {"count": 10}, "write_mode": "merge"})
    assert response.status_code == 422, response.text
    assert ["body", "write_mode"] in [error["loc"] for error in response.json()["detail"]], response.text
