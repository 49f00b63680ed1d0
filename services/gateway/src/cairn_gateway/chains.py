"""Chains (`/v1/chains`): jobs run one after another, each step able to read the previous one's
result into its params. A chain is recorded by the gateway and run by the scheduler's dependency
release (cairn_scheduler/workflows.py); nothing here waits for a step.

How a chain is recorded (no multi-document transaction, so the order matters):

1. the chain document (`chains`): tenant, name, the step job ids in order; its `_id` derives from
   the Idempotency-Key when there is one, else random; the step ids derive from the chain's id;
2. the step jobs, last to first: step i > 0 is a job whose `after` starts with step i-1 (then the
   step's own `after`), recorded WAITING; step 0 last, PENDING (WAITING if it names `after`),
   and its StartJob is published.

A gateway that dies part-way leaves a chain whose later steps wait for a step that was never
recorded: the scheduler's dependency sweep fails them after a grace period (a missing dependency),
and a client that retries with the same Idempotency-Key completes the chain instead (the ids are
the same, existing documents are kept). A chain with no step recorded at all reads FAILURE after
that grace period, with a `detail` saying so. The chain's state is never stored: it is derived from its
steps whenever it is read, so it cannot disagree with them.
"""

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.jobs import MISSING_DEPENDENCY_GRACE_MS, JobSpec
from cairn_contracts.states import JobState
from cairn_contracts.store import CHAINS, JOBS, JobRecord, job_id_for, spec_fingerprint
from cairn_gateway.catalog import check_spec
from cairn_gateway.errors import Conflict, Invalid, NotFound
from cairn_gateway.jobs import (
    JobFinished,
    JobService,
    NoDependency,
    after_cursor,
    check_dependencies,
    check_source,
    encode_cursor,
    job_progress,
    job_size,
    summary,
)
from cairn_gateway.jobs_schemas import ChainAccepted, ChainPage, ChainSpec, ChainStep, ChainView, JobSummary
from cairn_runtime import tally
from cairn_runtime.mongo import insert_new

logger = logging.getLogger(__name__)

_STEP_FIELDS = {"spec": 0, "result": 0, tally.LEDGER: 0}


class ChainNotFound(NotFound):
    def __init__(self, chain_id: str) -> None:
        super().__init__(f"no chain {chain_id}", chain_id)


class ChainIdempotencyConflict(Conflict):
    at = ("header", "Idempotency-Key")


def step_job_id(chain_id: str, index: int) -> str:
    """The job id of a chain's step: fixed by the chain's id, so a retried submit finds its steps."""
    return hashlib.sha256(f"{chain_id}\x00step\x00{index}".encode()).hexdigest()[:32]


def chain_fingerprint(chain: ChainSpec) -> str:
    return hashlib.sha256("\x00".join([chain.name or "", *(spec_fingerprint(step) for step in chain.steps)]).encode()).hexdigest()


def chain_state(steps: list[dict[str, Any]], age_ms: int = 0) -> tuple[JobState, int | None]:
    """(state, current step) of a chain from its step jobs in order (`{}` for a step not
    recorded): the first recorded step that has not succeeded decides (its stored state); all
    succeeded: SUCCESS. A step not recorded is passed over: deleted once finished (`DELETE
    /v1/jobs/{id}`), or never recorded (a half-recorded chain, see the module docstring), whose
    later steps the scheduler ends FAILURE; it would otherwise read WAITING forever. No step
    recorded at all: WAITING at step 0 while the chain is being recorded, FAILURE once it is
    `MISSING_DEPENDENCY_GRACE_MS` old (`age_ms`): its gateway died before recording any step."""
    if not any(steps):
        return (JobState.FAILURE if age_ms > MISSING_DEPENDENCY_GRACE_MS else JobState.WAITING), 0
    for index, job in enumerate(steps):
        if job and job["state"] != JobState.SUCCESS:
            return JobState(job["state"]), index
    return JobState.SUCCESS, None


@dataclass(frozen=True)
class ChainService:
    db: AsyncDatabase
    jobs: JobService

    async def submit(self, chain: ChainSpec, tenant: str, idempotency_key: str | None) -> ChainAccepted:
        """Record the chain and its steps, then publish step 0's StartJob (module docstring).

        Raises `Invalid` naming the step's field (["body", "steps", i, ...]): step 0 checked
        against the catalog as a job is; every step's pipeline announced; every `after` id a job of
        the tenant; `params_from` on step 0 only with an `after` of its own. Later steps' params
        that come from `params_from` are checked when the step is released (a refusal fails it).
        `ChainIdempotencyConflict` for a used Idempotency-Key with another body. The tenant's
        quotas hold for the steps as for as many jobs (tenants.py: `QuotaExceeded` 429 when its
        unfinished jobs and the steps exceed `max_running_jobs`, `QuotaInvalid` 422 at the step),
        and a step's mongo_range source must be the tenant's or granted."""
        fingerprint = chain_fingerprint(chain)
        chain_id = job_id_for(tenant, f"chain:{idempotency_key}") if idempotency_key is not None else uuid.uuid4().hex
        existing = None
        if idempotency_key is not None:
            existing = await self.db[CHAINS].find_one({"_id": chain_id, "tenant": tenant})
            if existing is not None and existing.get("fingerprint") != fingerprint:
                raise ChainIdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used for a different chain ({chain_id})")
        ids = [step_job_id(chain_id, index) for index in range(len(chain.steps))]
        records, sizes = [], []
        for index, step in enumerate(chain.steps):
            at = ("body", "steps", index)
            if index == 0 and step.params_from and not step.after:
                raise NoDependency((*at, "params_from"))
            await check_dependencies(self.db, tenant, step.after, (*at, "after"))
            checked = await check_spec(self.db, step, at)
            sizes.append(job_size(step, checked.space, at))
            # Its source must be the tenant's or granted; a later step may read what an earlier
            # one writes, so only step 0's must exist yet.
            await check_source(self.jobs.tenants, tenant, step, at, must_exist=index == 0)
            try:
                # Re-validated: the previous step joins `after`, which may now exceed its limit.
                spec = step if index == 0 else JobSpec.model_validate({**step.model_dump(), "after": [ids[index - 1], *step.after]})
            except ValidationError as error:
                raise Invalid.of([{**e, "loc": [*at, *e["loc"]]} for e in error.errors(include_url=False)]) from None
            records.append(
                JobRecord.new(
                    spec, tenant, job_id=ids[index], chain_id=chain_id, chain_step=index,
                    pipeline_version=checked.version, space=checked.space,
                )
            )
        if existing is None:
            # Each step is an unfinished job of the tenant from now on (a retry of a recorded
            # chain is not refused over its own steps).
            await self.jobs.tenants.check_submit(tenant, *sizes)  # 429/422 naming the quota
        now = clock.utcnow()
        try:
            await self.db[CHAINS].insert_one(
                {
                    "_id": chain_id, "tenant": tenant, "name": chain.name, "job_ids": ids, "fingerprint": fingerprint,
                    "idempotency_key": idempotency_key, "created_at": now, "created_at_ms": clock.to_ms(now),
                }
            )
            created = True
        except DuplicateKeyError:
            # The same Idempotency-Key, recorded by a concurrent request since the check above:
            # complete what it began, unless its body was another one.
            existing = await self.db[CHAINS].find_one({"_id": chain_id, "tenant": tenant}, {"fingerprint": 1})
            if existing is None or existing.get("fingerprint") != fingerprint:
                raise ChainIdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used for a different chain ({chain_id})") from None
            created = False
        # Last step first: a step exists before anything could release it.
        await insert_new(self.db[JOBS], [record.to_document() for record in reversed(records)])
        first = await self.db[JOBS].find_one({"_id": ids[0]}, {"command_published_at": 1, "state": 1})
        if first is not None and first.get("command_published_at") is None and not JobState(first["state"]).is_terminal:
            await self.jobs.publish_start(ids[0], tenant, records[0].job_spec())
        logger.info("chain %s recorded: %d step(s) %s", chain_id, len(ids), ", ".join(ids))
        return ChainAccepted(id=chain_id, created=created, job_ids=ids, url=f"/v1/chains/{chain_id}")

    async def get(self, tenant: str, chain_id: str) -> ChainView:
        """The chain with each step's job summary and progress. Raises `ChainNotFound`."""
        chain = await self.db[CHAINS].find_one({"_id": chain_id, "tenant": tenant})
        if chain is None:
            raise ChainNotFound(chain_id)
        return await self._view(chain)

    async def list(self, tenant: str, limit: int, cursor: str | None) -> ChainPage:
        """The tenant's chains, newest first (`next_cursor` pages on). Raises `InvalidCursor`."""
        found = self.db[CHAINS].find(after_cursor({"tenant": tenant}, cursor)).sort([("created_at_ms", -1), ("_id", -1)]).limit(limit + 1)
        chains = [chain async for chain in found]
        more = len(chains) > limit
        chains = chains[:limit]
        return ChainPage(
            items=[await self._view(chain) for chain in chains],
            next_cursor=encode_cursor(chains[-1]) if more and chains else None,
            limit=limit,
        )

    async def cancel(self, tenant: str, chain_id: str, requested_by: str) -> ChainView:
        """Cancel every step not finished yet (as `POST /v1/jobs/{id}/cancel` each); finished
        steps stay as they are. Raises `ChainNotFound`."""
        chain = await self.db[CHAINS].find_one({"_id": chain_id, "tenant": tenant})
        if chain is None:
            raise ChainNotFound(chain_id)
        # Last step first: a step is marked before its predecessor's cancel can end it (a WAITING
        # job whose dependency ended CANCELLED would end FAILURE, not CANCELLED).
        for job_id in reversed(chain["job_ids"]):
            try:
                await self.jobs.cancel(tenant, job_id, requested_by)
            except (JobFinished, NotFound):
                continue  # finished, or never recorded (a half-recorded chain)
        return await self._view(chain)

    async def _view(self, chain: dict[str, Any]) -> ChainView:
        ids = list(chain["job_ids"])
        jobs = {job["_id"]: job async for job in self.db[JOBS].find({"_id": {"$in": ids}, "tenant": chain["tenant"]}, _STEP_FIELDS)}
        ordered = [jobs.get(job_id, {}) for job_id in ids]
        state, current = chain_state(ordered, clock.now_ms() - int(chain.get("created_at_ms") or 0))
        steps = [
            ChainStep(index=index, job=JobSummary.model_validate(summary(job)), progress=job_progress(job, JobState(job["state"]))[0])
            for index, job in enumerate(ordered)
            if job
        ]
        detail = None
        if not steps and state == JobState.FAILURE:
            detail = "no step was recorded: the submission stopped part-way; submit the chain again with the same Idempotency-Key"
        return ChainView(
            id=chain["_id"], name=chain.get("name"), state=state, current_step=current, steps=steps,
            created_at=chain["created_at"], url=f"/v1/chains/{chain['_id']}", detail=detail,
        )
