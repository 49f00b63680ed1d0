"""Cairn's remote-control command finds the one started run of a shard in a pool process."""

from types import SimpleNamespace

from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD
from cairn_ingest_worker.control import find_run


def request(name: str, pid: int, started: bool = True, **kwargs: object) -> SimpleNamespace:
    return SimpleNamespace(name=name, worker_pid=pid, time_start=1.0 if started else None, kwargs=kwargs, id=f"task-{pid}-{name}")


def test_the_run_of_the_shard_in_that_process_is_found_and_nothing_else() -> None:
    shard_run = request(TASK_RUN_SHARD, 11, shard_key="job:0001", job_id="job")
    other_shard = request(TASK_RUN_SHARD, 12, shard_key="job:0002", job_id="job")
    lane = request(TASK_RUN_FRONTIER, 13, job_id="job", lane=0)
    not_started = request(TASK_RUN_SHARD, 14, started=False, shard_key="job:0004", job_id="job")
    running = [shard_run, other_shard, lane, not_started]
    assert find_run(running, 11, "job:0001", "job") is shard_run
    # The process now runs another shard (the one asked for ended meanwhile): not interrupted.
    assert find_run(running, 12, "job:0001", "job") is None
    # A lane names no shard: its process and job do.
    assert find_run(running, 13, "job:0007", "job") is lane
    assert find_run(running, 13, "other:0001", "other") is None
    assert find_run(running, 14, "job:0004", "job") is None  # reserved, not started
