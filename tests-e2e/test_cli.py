"""Issue 16, the `cairn` CLI: the installed console script drives the real system over HTTP only
(start → watch → result, a dead letter replayed), its output asserted as a user reads it."""

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from harness import System, dump

logger = logging.getLogger(__name__)
CAIRN = str(Path(sys.executable).parent / "cairn")


def cairn(system: System, *args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `cairn ARGS` against the system's gateway (URL and key from the environment)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    environment.update({"CAIRN_URL": system.base_url, "CAIRN_API_KEY": system.token or "", "COLUMNS": "160", **(env or {})})
    return subprocess.run([CAIRN, *args], env=environment, capture_output=True, text=True, timeout=timeout_s)


def cairn_json(system: System, *args: str) -> Any:
    done = cairn(system, "--json", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_starts_a_job_watches_it_to_the_end_and_shows_its_result(system: System, tmp_path: Path) -> None:
    collection = f"cli_{uuid.uuid4().hex[:8]}"
    started = cairn(
        system, "jobs", "start", "synthetic", "-p", "count=600", "-p", "delay_ms_per_record=2", "--shards", "3",
        "--batch-size", "50", "--collection", collection, "--name", "cli e2e", "--watch", "--interval", "0.3",
    )
    assert started.returncode == 0, started.stderr + started.stdout
    out = started.stdout
    logger.info("cairn jobs start --watch printed:\n%s", out)
    job_id = out.split("job ", 1)[1].split()[0]
    # The bars: the job and each of its 3 shards, with records/s and ETA columns, then the end.
    assert "job cli e2e" in out and "rec/s" in out and "ETA" in out, out
    assert out.count("shard ") >= 3, out
    assert f"job {job_id} SUCCESS: 600 records" in out, out

    result = cairn_json(system, "jobs", "result", job_id)
    assert result["state"] == "SUCCESS" and result["result"]["records_done"] == 600, dump(result)
    assert system.records(collection).count_documents({}) == 600

    listed = cairn_json(system, "jobs", "ls", "--query", "cli e2e")
    assert job_id in [job["id"] for job in listed["items"]]
    shown = cairn(system, "jobs", "show", job_id)
    assert shown.returncode == 0 and "SUCCEEDED" in shown.stdout and "100.0%" in shown.stdout, shown.stdout

    results = cairn_json(system, "results", "ls", "--state", "SUCCESS", "--limit", "200")
    assert job_id in [item["id"] for item in results["items"]], dump(results)
    listed_workers = cairn_json(system, "workers", "ls")
    assert [w["hostname"] for w in listed_workers] == ["cairn-ingest@worker-1"], dump(listed_workers)

    # A finished job's watch ends at once, exit 0; --json prints the states as lines.
    watched = cairn(system, "--json", "jobs", "watch", job_id)
    assert watched.returncode == 0 and json.loads(watched.stdout.splitlines()[-1])["state"] == "SUCCESS"

    # URL and key from a config file instead of the environment.
    config = tmp_path / "cairn.toml"
    config.write_text(f'url = "{system.base_url}"\napi_key = "{system.token}"\n')
    from_file = cairn(system, "--config", str(config), "jobs", "show", job_id, env={"CAIRN_URL": "", "CAIRN_API_KEY": ""})
    assert from_file.returncode == 0, from_file.stderr

    # Errors: the gateway's detail on stderr, exit 1; no key at all is a 401.
    missing = cairn(system, "jobs", "show", "no-such-job")
    assert missing.returncode == 1 and "404" in missing.stderr, missing.stderr
    no_key = cairn(system, "jobs", "ls", env={"CAIRN_API_KEY": ""})
    assert no_key.returncode == 1 and "401" in no_key.stderr, no_key.stderr
    bad = cairn(system, "jobs", "start", "synthetic", "-p", "count=-5")
    assert bad.returncode == 1 and "params.count" in bad.stderr, bad.stderr


def test_cli_manages_a_schedule(system: System) -> None:
    created = cairn_json(system, "schedules", "create", "synthetic", "-p", "count=10", "--cron", "0 0 1 1 *", "--name", "cli yearly")
    schedule_id = created["id"]
    upcoming = cairn(system, "schedules", "next", schedule_id, "-n", "3")
    assert upcoming.returncode == 0 and upcoming.stdout.count("-01-01") == 3, upcoming.stdout
    assert cairn_json(system, "schedules", "pause", schedule_id)["state"] == "paused"
    assert cairn_json(system, "schedules", "resume", schedule_id)["state"] == "active"
    table = cairn(system, "schedules", "ls")
    assert schedule_id[:12] in table.stdout and "0 0 1 1 *" in table.stdout, table.stdout
    removed = cairn(system, "schedules", "rm", schedule_id)
    assert removed.returncode == 0 and f"schedule {schedule_id} deleted" in removed.stdout
    assert cairn(system, "schedules", "show", schedule_id).returncode == 1


def test_cli_replays_a_dead_letter(system: System) -> None:
    source = f"cli-down-{uuid.uuid4().hex[:8]}"
    params = json.dumps({"count": 200, "fail_at_key": 150, "failure": "non_retryable", "key_prefix": source})
    started = cairn_json(system, "jobs", "start", "synthetic", "--params", params, "--batch-size", "50", "--collection", "cli_replay")
    job_id = started["id"]
    failed = cairn(system, "jobs", "watch", job_id, "--interval", "0.3")
    assert failed.returncode == 1 and f"job {job_id} FAILURE" in failed.stdout, failed.stdout

    listed = system.wait_for(lambda: cairn_json(system, "dlq", "ls", "--job", job_id)["items"], "the job's dead letter")
    entry_id = listed[0]["id"]
    table = cairn(system, "dlq", "ls", "--job", job_id)
    assert entry_id[:12] in table.stdout and "non_retryable" in table.stdout, table.stdout
    shown = cairn(system, "dlq", "show", entry_id)
    assert "NonRetryableError" in shown.stdout and "open" in shown.stdout, shown.stdout

    system.records("fixed_sources").insert_one({"_id": source})  # "fix the source" (flaky_source.py)
    replayed = cairn(system, "dlq", "replay", entry_id, "--note", "source fixed")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replay of {entry_id}: command" in replayed.stdout and "done dispatched" in replayed.stdout, replayed.stdout

    system.wait_for_state(job_id, {"SUCCESS"}, timeout_s=120)
    done = cairn(system, "jobs", "watch", job_id)
    assert done.returncode == 0 and f"job {job_id} SUCCESS: 200 records" in done.stdout, done.stdout
    settled = system.wait_for(
        lambda: (e := cairn_json(system, "dlq", "show", entry_id))["status"] == "replayed" and e, "the entry to settle"
    )
    assert settled["replay"]["outcome"] == "succeeded", dump(settled)
    # A replayed entry cannot be replayed again: the gateway's 409, exit 1.
    again = cairn(system, "dlq", "replay", entry_id)
    assert again.returncode == 1 and "409" in again.stderr, again.stderr
