"""Workflows: releasing the jobs that wait for others (`after`; a chain's steps are such jobs).

A job whose spec names `after: [job ids]` is recorded WAITING by the gateway. It is *settled*
here, from its dependencies' states, by exactly one of three conditional updates on
`{_id, state: WAITING}` (so a second scheduler, or a redelivery, changes nothing):

- every dependency SUCCEEDED (with `on_dependency_failure: run`, every one finished): *release*:
  its `params_from` are filled from its first dependency (`after[0]`), the filled spec is
  checked against the pipeline catalog and the tenant's per-job quotas (its own, else
  `defaults`; the gateway could not size it before), and the job becomes PENDING with the filled spec, its
  work space and `command_published_at: null`; then its StartJob is published (a scheduler that
  dies in between leaves a PENDING job without a published command, which the maintenance
  relay publishes);
- a dependency ended FAILURE or CANCELLED (or is gone: deleted, or never recorded within
  `missing_grace_ms`), or the params could not be filled or were refused: *stop*: FAILURE
  (`fail`, the default) or CANCELLED (`skip`), with `dependency_failure` = `{at: "after[i]",
  job_id, state, reason}` on the job and in its result; its own dependents are settled in turn;
- otherwise it keeps waiting.

When it is looked at: the scheduler calls `job_finished` after each terminal state it writes
(the roll-up, a cancel, a stop here), which settles the jobs waiting for that one; the StartJob
the gateway publishes for a WAITING job settles it (a dependency may have finished before it was
recorded); and `sweep` (every `CAIRN_RECONCILE_INTERVAL_S`) settles every WAITING job, which
makes up for a scheduler killed between a job's terminal write and the release of its dependents.

A job is settled once: a dependency reopened later by a DLQ replay does not reopen or re-run the
jobs that waited for it.
"""

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.jobs import JOB_SPEC_ADAPTER, MISSING_DEPENDENCY_GRACE_MS, JobSpec
from cairn_contracts.messages import StartJob
from cairn_contracts.pipelines import CatalogRefusal
from cairn_contracts.states import JobState
from cairn_contracts.store import DEFAULT_TENANT, JOBS
from cairn_contracts.tenancy import TENANTS, TenantQuotas, TenantRecord, job_demand
from cairn_runtime.amqp import Publisher, PublishNotConfirmed
from cairn_runtime.log import log_context
from cairn_scheduler.jobs import LockRelease, catalog_space
from cairn_scheduler.stopping import empty_result

logger = logging.getLogger(__name__)

# A dependency not recorded (yet): a chain's steps are inserted together, but not atomically.
MISSING_GRACE_MS = MISSING_DEPENDENCY_GRACE_MS
_DEPENDENCY_FIELDS = {"tenant": 1, "name": 1, "pipeline": 1, "state": 1, "spec": 1, "records_total": 1, "result": 1, "records_deleted": 1}


@dataclass(frozen=True)
class Decision:
    """What a WAITING job does now: `wait`, `start`, or `stop` in `state` for `failure`."""

    action: Literal["wait", "start", "stop"]
    state: JobState | None = None
    failure: dict[str, Any] | None = None


WAIT = Decision("wait")


def stop(policy: str, at: str, job_id: str | None, state: str | None, reason: str) -> Decision:
    """A stop by the job's `on_dependency_failure`: CANCELLED for `skip`, else FAILURE."""
    return Decision(
        "stop",
        JobState.CANCELLED if policy == "skip" else JobState.FAILURE,
        {"at": at, "job_id": job_id, "state": state, "reason": reason},
    )


def decide(job: dict[str, Any], dependencies: dict[str, dict[str, Any]], now_ms: int, missing_grace_ms: int = MISSING_GRACE_MS) -> Decision:
    """The decision for a WAITING `job` given its dependencies' documents by id (those found;
    each with at least `state`). Pure: the one rule, unit-tested on its own (module docstring)."""
    policy = (job.get("spec") or {}).get("on_dependency_failure", "fail")
    after = list(job.get("after") or [])
    unfinished = False
    for index, dependency_id in enumerate(after):
        at = f"after[{index}]"
        dependency = dependencies.get(dependency_id)
        if dependency is None:
            if now_ms - int(job.get("created_at_ms") or 0) < missing_grace_ms:
                unfinished = True  # a step of a chain being recorded: give it time
                continue
            if policy == "run":
                continue  # gone counts as finished: `run` starts once nothing is left to wait for
            return stop(policy, at, dependency_id, None, f"{at}: job {dependency_id} does not exist (deleted, or never recorded)")
        state = JobState(dependency["state"])
        if not state.is_terminal:
            unfinished = True
        elif state != JobState.SUCCESS and policy != "run":
            return stop(policy, at, dependency_id, str(state), f"{at}: job {dependency_id} ended {state}")
    return WAIT if unfinished else Decision("start")


def dependency_view(dependency: dict[str, Any]) -> dict[str, Any]:
    """What `params_from` paths read of a finished dependency (cairn_contracts.jobs.DEPENDENCY_FIELDS)."""
    spec = dependency.get("spec") or {}
    result = dict(dependency.get("result") or {})
    if "records_deleted" in dependency:
        result["records_deleted"] = dependency["records_deleted"]
    return {
        "job_id": dependency["_id"],
        "name": dependency.get("name"),
        "pipeline": dependency.get("pipeline"),
        "state": dependency.get("state"),
        "params": spec.get("params") or {},
        "target_collection": spec.get("target_collection"),
        "records_total": dependency.get("records_total"),
        "result": result,
    }


class MissingValue(ValueError):
    """A `params_from` path that names nothing in the dependency (an expired result, a typo)."""


def read_path(view: Any, path: str) -> Any:
    """The value at a dotted path (list items by index). Raises MissingValue."""
    value = view
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingValue(f"{path!r} is not in the dependency (no {part!r})")
    return value


def fill_params(params: dict[str, Any], params_from: dict[str, str], view: dict[str, Any]) -> dict[str, Any]:
    """`params` with each `params_from` entry (param path -> path in `view`) set; nested param
    paths create the objects they need. Raises MissingValue naming the path."""
    filled = {**params}
    for target, source in params_from.items():
        value = read_path(view, source)
        *parents, last = target.split(".")
        node = filled
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[last] = value
    return filled


@dataclass(frozen=True)
class DependencyRelease:
    """Settles WAITING jobs (module docstring). `publisher` sends a released job's StartJob;
    `locks` releases the gateway's job lock of a job stopped here; `defaults`: the per-job quotas
    of a tenant that sets none (`CAIRN_TENANT_MAX_SHARDS_PER_JOB`, `..._RECORDS_PER_JOB`, as the
    gateway's), checked on a `params_from` job's filled spec."""

    db: AsyncDatabase
    publisher: Publisher
    locks: LockRelease | None = None
    missing_grace_ms: int = MISSING_GRACE_MS
    defaults: TenantQuotas = TenantQuotas()

    async def settle(self, job_id: str) -> JobState | None:
        """Decide the job if it is WAITING; returns the state this call moved it to (PENDING,
        FAILURE, CANCELLED), or None (still waiting, not waiting, or decided by another
        scheduler). A stop settles the jobs waiting for this one in turn."""
        state = await self._settle_one(job_id)
        if state is not None and state.is_terminal:
            await self.job_finished(job_id)
        return state

    async def job_finished(self, job_id: str) -> int:
        """Settle the WAITING jobs that name `job_id` (and, for each one stopped, those waiting
        for it, and so on); returns how many were released or stopped."""
        settled = 0
        finished = [job_id]
        while finished:
            current = finished.pop()
            # `$in` with one value: array membership, which the MongoDB stand-in misses for a plain equality.
            async for waiting in self.db[JOBS].find({"state": JobState.WAITING, "after": {"$in": [current]}}, {"_id": 1}):
                state = await self._settle_one(waiting["_id"])
                settled += state is not None
                if state is not None and state.is_terminal:
                    finished.append(waiting["_id"])
        return settled

    async def sweep(self) -> int:
        """Settle every WAITING job (the safety net for a release missed by a killed scheduler);
        returns how many were released or stopped."""
        settled = 0
        async for job in self.db[JOBS].find({"state": JobState.WAITING}, {"_id": 1}):
            settled += await self.settle(job["_id"]) is not None
        if settled:
            logger.info("dependency sweep: %d waiting job(s) settled", settled)
        return settled

    async def _settle_one(self, job_id: str) -> JobState | None:
        job = await self.db[JOBS].find_one({"_id": job_id, "state": JobState.WAITING})
        if job is None or job.get("cancel_requested"):
            return None  # not waiting, or a cancel is on its way (the cancel finishes it)
        after = list(job.get("after") or [])
        dependencies = {
            d["_id"]: d async for d in self.db[JOBS].find({"_id": {"$in": after}, "tenant": job["tenant"]}, _DEPENDENCY_FIELDS)
        }
        decision = decide(job, dependencies, clock.now_ms(), self.missing_grace_ms)
        with log_context(job_id=job_id):
            if decision.action == "start":
                return await self._release(job, dependencies)
            if decision.action == "stop":
                return await self._stop(job, decision)
        return None

    async def _release(self, job: dict[str, Any], dependencies: dict[str, dict[str, Any]]) -> JobState | None:
        job_id = job["_id"]
        spec = JOB_SPEC_ADAPTER.validate_python(job["spec"])
        now = clock.utcnow()
        update: dict[str, Any] = {"state": JobState.PENDING, "released_at": now, "released_at_ms": clock.to_ms(now), "command_published_at": None}
        if spec.params_from:
            first = job["after"][0]
            policy = spec.on_dependency_failure
            if first not in dependencies:
                return await self._stop(job, stop(policy, "after[0]", first, None, f"params_from: job {first} does not exist"))
            try:
                params = fill_params(spec.params, spec.params_from, dependency_view(dependencies[first]))
                spec = JobSpec.model_validate({**spec.model_dump(mode="json"), "params": params})
                version, space = await catalog_space(self.db, spec, at=())
            except (MissingValue, ValidationError, CatalogRefusal) as error:
                reason = f"params_from of after[0] (job {first}): {_reason(error)}"
                return await self._stop(job, stop("fail", "after[0]", first, dependencies[first].get("state"), reason))
            # The gateway could not size the job before its params were filled: the tenant's
            # per-job quotas hold here, or params_from would carry a job past them.
            over = job_demand(spec, space).over(await self._quotas(job.get("tenant") or DEFAULT_TENANT))
            if over is not None:
                reason = f"params_from of after[0] (job {first}): params: quota {over[0]} exceeded: {over[1]}"
                return await self._stop(job, stop("fail", "after[0]", first, dependencies[first].get("state"), reason))
            update.update(spec=spec.model_dump(mode="json"), space=space, pipeline_version=version)
        released = await self.db[JOBS].update_one(
            {"_id": job_id, "state": JobState.WAITING, "cancel_requested": {"$in": [False, None]}}, {"$set": update}
        )
        if not released.modified_count:
            return None  # another scheduler settled it, or a cancel came first
        logger.info("job %s released: its dependencies %s finished; job PENDING", job_id, ", ".join(job["after"]))
        try:
            await self.publisher.publish(StartJob(job_id=job_id, tenant=job["tenant"], spec=spec), priority=int(spec.priority), correlation_id=job_id)
        except PublishNotConfirmed:
            logger.warning("job %s released; its command was not confirmed and will be relayed", job_id, exc_info=True)
            return JobState.PENDING
        await self.db[JOBS].update_one({"_id": job_id, "command_published_at": None}, {"$set": {"command_published_at": clock.utcnow()}})
        return JobState.PENDING

    async def _quotas(self, tenant: str) -> TenantQuotas:
        """The tenant's quotas in force: its own (`tenants`), else `defaults`."""
        return TenantRecord.of(await self.db[TENANTS].find_one({"_id": tenant}, {"quotas": 1})).quotas.merged(self.defaults)

    async def _stop(self, job: dict[str, Any], decision: Decision) -> JobState | None:
        assert decision.state is not None and decision.failure is not None
        now = clock.utcnow()
        stopped = await self.db[JOBS].update_one(
            # As the release: a cancel marked since the job was read wins (the cancel ends it CANCELLED).
            {"_id": job["_id"], "state": JobState.WAITING, "cancel_requested": {"$in": [False, None]}},
            {
                "$set": {
                    "state": decision.state,
                    "finished_at": now,
                    "finished_at_ms": clock.to_ms(now),
                    "dependency_failure": decision.failure,
                    "result": {**empty_result(), "dependency_failure": decision.failure},
                }
            },
        )
        if not stopped.modified_count:
            return None
        logger.info("job %s WAITING -> %s: %s", job["_id"], decision.state, decision.failure["reason"])
        if self.locks is not None:
            await self.locks.release_job(job)
        return decision.state


def _reason(error: Exception) -> str:
    if isinstance(error, CatalogRefusal):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in error.errors)
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    return str(error)
