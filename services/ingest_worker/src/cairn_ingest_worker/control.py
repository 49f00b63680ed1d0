"""Cairn's own Celery remote-control command: stop one shard's run now (`cairn_terminate_shard`).

Celery's `revoke(terminate=True)` acks the delivery and adds the task id to the worker's revoked
set, so a lease-frontier lane (which re-sends itself under the same task id) would be dropped at
its next slice. This command instead signals the one pool process running the shard with
`SIGUSR1`, which billiard turns into `SoftTimeLimitExceeded` inside the task: the runner gives up
the batch in flight uncommitted (as for a soft time limit), its fenced writes are refused (the
gateway bumped the fencing token of the shard and its checkpoint first), and the task ends and is
acked normally; a frontier lane goes on with its next item.

Imported by bootstrap.py, which registers the command in the worker's control panel (Celery keeps
the registry process-wide). Runs in the worker's main process, never in a pool child.
"""

import logging
import signal
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import control_command, nok, ok

from cairn_contracts.tasks import TASK_RUN_FRONTIER, TASK_RUN_SHARD, TASK_RUN_SHARDS

logger = logging.getLogger(__name__)

TERMINATE_SHARD = "cairn_terminate_shard"


def find_run(requests: Any, pid: int, shard_key: str, job_id: str) -> Any | None:
    """The started request of pool process `pid` that runs `shard_key`: a `run_shard` of that
    shard, a `run_shards` bundle naming it, or a `run_frontier` lane of its job (a lane names no shard; its pid does). None if
    that process runs something else now (the shard's run ended meanwhile)."""
    for request in list(requests):
        if request.worker_pid != pid or not request.time_start:
            continue
        kwargs = request.kwargs or {}
        if request.name == TASK_RUN_SHARD and kwargs.get("shard_key") == shard_key:
            return request
        if request.name == TASK_RUN_SHARDS and shard_key in (kwargs.get("shard_keys") or ()):
            return request  # a bundle: the interrupt stops the shard it runs now (fenced either way)
        if request.name == TASK_RUN_FRONTIER and kwargs.get("job_id") == job_id:
            return request
    return None


@control_command(
    args=[("pid", int), ("shard_key", str), ("job_id", str)],
    signature="<pid> <shard_key> <job_id>",
)
def cairn_terminate_shard(state: Any, pid: int, shard_key: str, job_id: str, **_: Any) -> dict[str, Any]:
    """Interrupt the batch in flight of `shard_key` in pool process `pid` (SIGUSR1). Reply
    `{"ok": {"task_id", "pid"}}`, or `{"error": why}` if that process does not run the shard."""
    request = find_run(worker_state.active_requests, int(pid), shard_key, job_id)
    if request is None:
        return nok(f"pool process {pid} runs no task of shard {shard_key}")
    logger.warning("shard %s: terminated by an operator; interrupting task %s in pool process %d", shard_key, request.id, pid)
    state.consumer.pool.terminate_job(int(pid), signal.SIGUSR1)
    return ok({"task_id": request.id, "pid": int(pid)})
