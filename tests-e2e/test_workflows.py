"""Issue 16 workflows end to end, every service a process of its own: a chain of three jobs where
steps 2 and 3 take their params from the previous step's result, and jobs with `after` released
when their dependencies succeed, ended when one fails (FAILURE, or CANCELLED with `skip`)."""

import uuid
from typing import Any

from test_cli import cairn, cairn_json

from cairn_contracts.clock import stored_ms
from harness import System, dump

TERMINAL = {"SUCCESS", "FAILURE", "CANCELLED"}


def wait_for_chain(system: System, url: str, timeout_s: float = 240) -> dict[str, Any]:
    with system.client() as client:
        return system.wait_for(lambda: (c := client.get(url).json()) and c["state"] in TERMINAL and c, f"chain {url} to finish", timeout_s=timeout_s, poll_s=0.3)


def wait_for_job(system: System, job_id: str, timeout_s: float = 180) -> dict[str, Any]:
    with system.client() as client:
        return system.wait_for(
            lambda: (j := client.get(f"/v1/jobs/{job_id}").json()) and j["state"] in TERMINAL and j, f"job {job_id} to finish", timeout_s=timeout_s, poll_s=0.3
        )


def test_a_chain_of_three_jobs_passes_each_result_to_the_next(system: System) -> None:
    run = uuid.uuid4().hex[:8]
    first, second, third = (f"e2e_chain_{run}_{n}" for n in ("ingest", "copy", "readback"))
    steps = [
        # 1: 300 generated records.
        {"pipeline": "synthetic", "params": {"count": 300, "key_prefix": f"a{run}"}, "sharding": {"shards": 2}, "batch_size": 100, "target_collection": first},
        # 2: as many records as step 1 wrote (its count comes from step 1's result).
        {
            "pipeline": "synthetic", "params": {"key_prefix": f"b{run}"}, "params_from": {"count": "result.records_written"},
            "sharding": {"shards": 3}, "batch_size": 100, "target_collection": second,
        },
        # 3: reads back the collection step 2 wrote, over the key range step 2 covered.
        {
            "pipeline": "mongo_range", "params": {"key_field": "seq", "start": 0},
            "params_from": {"collection": "target_collection", "end": "result.records_written"},
            "sharding": {"shards": 2}, "batch_size": 100, "target_collection": third,
        },
    ]
    with system.client() as client:
        answer = client.post("/v1/chains", json={"name": f"chain {run}", "steps": steps})
        assert answer.status_code == 202, answer.text
        accepted = answer.json()
        early = client.get(accepted["url"]).json()
    assert [s["job"]["state"] for s in early["steps"]][1:] == ["WAITING", "WAITING"], dump(early)  # step 1 takes seconds

    chain = wait_for_chain(system, accepted["url"])

    assert chain["state"] == "SUCCESS" and chain["current_step"] is None, dump(chain)
    jobs = [system.db.jobs.find_one({"_id": job_id}) for job_id in accepted["job_ids"]]
    assert [j["state"] for j in jobs] == ["SUCCESS"] * 3, dump(jobs)
    assert jobs[1]["spec"]["params"]["count"] == 300  # step 1's records_written
    assert (jobs[2]["spec"]["params"]["collection"], jobs[2]["spec"]["params"]["end"]) == (second, 300)  # step 2's target and result
    assert [j["result"]["records_written"] for j in jobs] == [300, 300, 300], dump([j["result"] for j in jobs])
    assert system.records(third).count_documents({}) == 300 and system.records(third).find_one({"_id": f"{second}:299"}) is not None
    for previous, step in zip(jobs, jobs[1:], strict=False):  # each step released after the previous one finished
        assert step["released_at_ms"] >= stored_ms(previous["finished_at"]), dump([previous, step])
    shown = cairn(system, "chains", "show", accepted["id"])
    assert shown.returncode == 0, shown.stderr + shown.stdout
    assert f"chain {accepted['id']} chain {run} SUCCESS" in shown.stdout and shown.stdout.count("SUCCESS") == 4, shown.stdout
    assert all(job_id in shown.stdout for job_id in accepted["job_ids"]), shown.stdout


def test_after_releases_a_job_on_success_and_ends_it_when_a_dependency_fails(system: System) -> None:
    run = uuid.uuid4().hex[:8]
    slow_ok = {"pipeline": "synthetic", "params": {"count": 200, "delay_ms_per_record": 10, "key_prefix": f"ok{run}"}, "target_collection": f"e2e_after_{run}"}
    failing = {
        "pipeline": "synthetic", "params": {"count": 200, "fail_at_key": 150, "failure": "non_retryable", "key_prefix": f"bad{run}"},
        "retry": {"max_attempts": 1}, "target_collection": f"e2e_after_{run}",
    }
    with system.client() as client:
        ok = client.post("/v1/jobs", json=slow_ok).json()["id"]
        bad = client.post("/v1/jobs", json=failing).json()["id"]
        follower = {"pipeline": "synthetic", "params": {"key_prefix": f"f{run}"}, "target_collection": f"e2e_after_{run}"}
        failed = client.post("/v1/jobs", json={**follower, "params": {"count": 10, "key_prefix": f"g{run}"}, "after": [ok, bad]})
        skipped = client.post("/v1/jobs", json={**follower, "params": {"count": 10, "key_prefix": f"h{run}"}, "after": [bad], "on_dependency_failure": "skip"})
        assert [r.status_code for r in (failed, skipped)] == [202] * 2, [r.text for r in (failed, skipped)]
        failed_id, skipped_id = (r.json()["id"] for r in (failed, skipped))
    released = cairn_json(
        system, "jobs", "start", "synthetic", "-p", f"key_prefix=f{run}", "--collection", f"e2e_after_{run}",
        "--after", ok, "--param-from", "count=result.records_written",
    )
    assert released["state"] == "WAITING", dump(released)
    released_id = released["id"]

    done = wait_for_job(system, released_id)
    assert done["state"] == "SUCCESS" and done["records_done"] == 200, dump(done)  # its count is the dependency's records_written
    assert done["spec"]["params"]["count"] == 200 and done["after"] == [ok]
    dependency = system.db.jobs.find_one({"_id": ok})
    assert dependency["state"] == "SUCCESS"
    assert system.db.jobs.find_one({"_id": released_id})["released_at_ms"] >= stored_ms(dependency["finished_at"])

    ended = wait_for_job(system, failed_id)
    assert ended["state"] == "FAILURE", dump(ended)
    assert ended["dependency_failure"] == {"at": "after[1]", "job_id": bad, "state": "FAILURE", "reason": f"after[1]: job {bad} ended FAILURE"}
    assert system.db.shards.count_documents({"job_id": failed_id}) == 0  # never planned, never ran
    with system.client() as client:
        result = client.get(f"/v1/jobs/{failed_id}/result").json()
    assert result["result"]["dependency_failure"]["job_id"] == bad, dump(result)

    not_run = wait_for_job(system, skipped_id)
    assert not_run["state"] == "CANCELLED" and not_run["dependency_failure"]["at"] == "after[0]", dump(not_run)
    assert system.db.shards.count_documents({"job_id": skipped_id}) == 0
