"""Schedules as the gateway keeps them: create, read, change (PATCH) or replace (PUT), pause,
resume, delete (one or a batch), trigger now, and list the next run times.

A schedule also has a free-text `description` and an `overlap` policy (skip, buffer_one,
allow_all, cancel_other) that the scheduler applies when a run falls due while the previous one
is active (cairn_scheduler/schedules.py).

The gateway records a schedule with its first `next_run_at_ms`; the scheduler service fires it
(cairn_scheduler/schedules.py). Both compute run times with the same `ScheduleTiming`
(cairn_contracts/schedules.py). Every change of a schedule the scheduler may be firing at the
same moment is one conditional update on the fields the scheduler's claim changes
(`next_run_at_ms`, `total_runs`), retried on a lost race, so a change never undoes a claimed run
and a claim never fires a run the change removed.

Trigger now submits the schedule's job like an API submission (JobService.submit: lock and
idempotency included), with the idempotency key `schedule:<id>:manual:<Idempotency-Key or a
uuid>`; it does not count toward `max_runs` and does not move the next run.
"""

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.jobs import JOB_SPEC_ADAPTER, JobSpec
from cairn_contracts.schedules import OverlapPolicy, ScheduleTiming
from cairn_contracts.store import SCHEDULES
from cairn_gateway.catalog import check_spec
from cairn_gateway.errors import Conflict, Invalid, NotFound
from cairn_gateway.joblock import DuplicateJob
from cairn_gateway.jobs import JobService, after_cursor, check_source, encode_cursor, job_size
from cairn_gateway.jobs_schemas import BatchDeleted, NextRuns, SchedulePage, ScheduleUpdate, ScheduleView, TriggerAccepted
from cairn_gateway.tenants import TenantService, check_job_size
from cairn_runtime.amqp import Publisher

logger = logging.getLogger(__name__)

TIMING_FIELDS = tuple(ScheduleTiming.model_fields)
KIND_FIELDS = ("cron", "interval_s", "at")
_RACE_RETRIES = 5


class ScheduleNotFound(NotFound):
    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule {schedule_id}", schedule_id)


class ScheduleChanged(Conflict):
    """The scheduler claimed runs of the schedule on every try of a change: the client retries."""

    def __init__(self, schedule_id: str, action: str) -> None:
        super().__init__(f"the schedule kept changing while it was {action}; try again", schedule_id)


class ScheduleCreate(ScheduleTiming):
    """A schedule: when (the timing fields) and what (`job`, a job spec as POST /v1/jobs takes)."""

    name: str | None = Field(None, max_length=200)
    description: str | None = Field(None, max_length=2000, description="Free text: what the schedule is for")
    overlap: OverlapPolicy = Field(
        "skip",
        description="A run due while the previous run is active: skip it, buffer_one (start it when the previous ends), "
        "allow_all (start it anyway) or cancel_other (cancel the previous, then start it)",
    )
    job: JobSpec
    paused: bool = Field(False, description="Create it paused (resume to start it)")


def schedule_view(doc: dict[str, Any]) -> ScheduleView:
    if doc.get("paused"):
        state = "paused"
    elif doc.get("next_run_at_ms") is None:
        state = "finished"
    else:
        state = "active"
    return ScheduleView(
        id=doc["_id"],
        name=doc.get("name"),
        description=doc.get("description"),
        overlap=doc.get("overlap") or "skip",
        kind=doc["kind"],
        cron=doc.get("cron"),
        timezone=doc.get("timezone") or "UTC",
        interval_s=doc.get("interval_s"),
        at=clock.from_ms_field(doc.get("at_ms")),
        start_at=clock.from_ms_field(doc.get("start_at_ms")),
        end_at=clock.from_ms_field(doc.get("end_at_ms")),
        max_runs=doc.get("max_runs"),
        job=doc["job"],
        paused=bool(doc.get("paused")),
        state=state,
        next_run_at=clock.from_ms_field(doc.get("next_run_at_ms")),
        last_run_at=clock.from_ms_field(doc.get("last_run_at_ms")),
        last_job_id=doc.get("last_job_id"),
        total_runs=int(doc.get("total_runs", 0)),
        manual_runs=int(doc.get("manual_runs", 0)),
        skipped_runs=int(doc.get("skipped_runs", 0)),
        buffered_run=isinstance(doc.get("buffered_run"), dict),
        created_at=clock.from_ms_field(doc.get("created_at_ms")) or doc["created_at"],
        updated_at=clock.from_ms_field(doc.get("updated_at_ms")),
        url=f"/v1/schedules/{doc['_id']}",
    )


def timing_of(doc: dict[str, Any]) -> ScheduleTiming:
    fields = {name: doc.get(name) for name in TIMING_FIELDS}
    for name in ("at", "start_at", "end_at"):
        fields[name] = clock.from_ms_field(doc.get(f"{name}_ms"))
    fields["timezone"] = fields["timezone"] or "UTC"
    return ScheduleTiming.model_validate(fields)


def _next_run(timing: ScheduleTiming, now_ms: int, anchor_ms: int, runs_done: int) -> dict[str, Any]:
    due = timing.next_run_ms(now_ms, anchor_ms=anchor_ms, runs_done=runs_done)
    return {"next_run_at_ms": due, "next_run_at": clock.from_ms(due) if due is not None else None}


async def check_schedule_job(db: AsyncDatabase, tenants: TenantService, tenant: str, spec: JobSpec) -> None:
    """A schedule's job as the catalog accepts it, and without workflow fields: each run is a
    new job, so fixed `after` ids would hold every run to the same old jobs (a chain of runs is
    the overlap policy's `buffer_one`). The runs the scheduler fires are not submitted through the
    API, so the job is held here to the tenant's per-job quotas and, for `mongo_range`, to its
    namespace or a granted source (the workers check the grant again at every run). Raises
    `Invalid` naming the field (["body", "job", ...]), `QuotaInvalid` naming the quota."""
    at = ("body", "job")
    for field in ("after", "params_from"):
        if getattr(spec, field):
            raise Invalid(f"a schedule's job cannot name `{field}`: each run is a new job (see overlap: buffer_one)", (*at, field))
    checked = await check_spec(db, spec, at)
    check_job_size(await tenants.quotas(tenant), job_size(spec, checked.space, at))
    await check_source(tenants, tenant, spec, at, must_exist=False)  # created by an earlier run, maybe


@dataclass(frozen=True)
class ScheduleService:
    db: AsyncDatabase
    publisher: Publisher
    jobs: JobService

    async def create(self, tenant: str, body: ScheduleCreate) -> ScheduleView:
        now_ms = clock.now_ms()
        timing = ScheduleTiming.model_validate(body.model_dump(include=set(TIMING_FIELDS)))
        if timing.kind == "once" and timing.at is not None and clock.to_ms(timing.at) <= now_ms:
            raise Invalid("`at` is in the past: a one-off schedule would never run", ("body", "at"))
        anchor_ms = timing.anchor_ms(now_ms)
        upcoming = _next_run(timing, now_ms, anchor_ms, 0)
        if upcoming["next_run_at_ms"] is None:
            raise Invalid("no run is left between now and end_at", ("body", "end_at"))
        await check_schedule_job(self.db, self.jobs.tenants, tenant, body.job)  # the job must pass the catalog now, not at its first run
        now = clock.from_ms(now_ms)
        document = {
            "_id": uuid.uuid4().hex,
            "tenant": tenant,
            "name": body.name,
            "description": body.description,
            "overlap": body.overlap,
            "job": body.job.model_dump(mode="json"),
            "paused": body.paused,
            **timing.timing_fields(),
            "anchor_ms": anchor_ms,
            **upcoming,
            "last_run_at_ms": None,
            "last_job_id": None,
            "total_runs": 0,
            "manual_runs": 0,
            "created_at": now,
            "created_at_ms": now_ms,
            "updated_at_ms": now_ms,
        }
        await self.db[SCHEDULES].insert_one(document)
        logger.info("schedule %s (%s) created for tenant %s", document["_id"], timing.kind, tenant)
        return schedule_view(document)

    async def list(self, tenant: str, limit: int, cursor: str | None) -> SchedulePage:
        query = after_cursor({"tenant": tenant}, cursor)
        found = self.db[SCHEDULES].find(query).sort([("created_at_ms", -1), ("_id", -1)]).limit(limit + 1)
        docs = [doc async for doc in found]
        more = len(docs) > limit
        docs = docs[:limit]
        return SchedulePage(
            items=[schedule_view(d) for d in docs], next_cursor=encode_cursor(docs[-1]) if more and docs else None, limit=limit
        )

    async def get(self, tenant: str, schedule_id: str) -> ScheduleView:
        return schedule_view(await self._doc(tenant, schedule_id))

    async def update(self, tenant: str, schedule_id: str, patch: ScheduleUpdate) -> ScheduleView:
        changed = patch.model_fields_set
        for _ in range(_RACE_RETRIES):
            doc = await self._doc(tenant, schedule_id)
            now_ms = clock.now_ms()
            fields: dict[str, Any] = {"updated_at_ms": now_ms}
            for plain in ("name", "description"):
                if plain in changed:
                    fields[plain] = getattr(patch, plain)
            if "overlap" in changed:
                fields["overlap"] = patch.overlap or "skip"
            if "job" in changed:
                if patch.job is None:
                    raise Invalid("a schedule needs a job", ("body", "job"))
                await check_schedule_job(self.db, self.jobs.tenants, tenant, patch.job)
                fields["job"] = patch.job.model_dump(mode="json")
            timing_changes = changed & set(TIMING_FIELDS)
            if timing_changes:
                current = timing_of(doc).model_dump()
                if "kind" in changed and patch.kind != current["kind"]:
                    for name in KIND_FIELDS:  # the old kind's fields do not carry over
                        current[name] = None
                current.update({name: getattr(patch, name) for name in timing_changes})
                if current.get("timezone") is None:
                    current["timezone"] = "UTC"
                try:
                    timing = ScheduleTiming.model_validate(current)
                except ValidationError as error:
                    raise Invalid.of([{**e, "loc": ["body", *e["loc"]]} for e in error.errors(include_url=False)]) from None
                anchor_ms = timing.anchor_ms(now_ms) if timing.kind == "interval" else int(doc.get("anchor_ms") or now_ms)
                fields.update(timing.timing_fields(), anchor_ms=anchor_ms)
                fields.update(_next_run(timing, now_ms, anchor_ms, int(doc.get("total_runs", 0))))
            updated = await self._swap(doc, fields)
            if updated is not None:
                return schedule_view(updated)
        raise ScheduleChanged(schedule_id, "updated")

    async def replace(self, tenant: str, schedule_id: str, body: ScheduleCreate) -> ScheduleView:
        """PUT: every field from `body` (left out: its default); the run counters (`total_runs`,
        `manual_runs`, `skipped_runs`) and a buffered run stay, the next run is recomputed from
        now. Raises `ScheduleNotFound`, `Invalid` (no run left), `ScheduleChanged`."""
        timing = ScheduleTiming.model_validate(body.model_dump(include=set(TIMING_FIELDS)))
        for _ in range(_RACE_RETRIES):
            doc = await self._doc(tenant, schedule_id)
            now_ms = clock.now_ms()
            anchor_ms = timing.anchor_ms(now_ms)
            upcoming = _next_run(timing, now_ms, anchor_ms, int(doc.get("total_runs", 0)))
            if upcoming["next_run_at_ms"] is None:
                raise Invalid("no run is left between now and end_at (or max_runs is reached)", ("body", "end_at"))
            fields = {
                "name": body.name,
                "description": body.description,
                "overlap": body.overlap,
                "job": body.job.model_dump(mode="json"),
                "paused": body.paused,
                **timing.timing_fields(),
                "anchor_ms": anchor_ms,
                **upcoming,
                "updated_at_ms": now_ms,
            }
            updated = await self._swap(doc, fields)
            if updated is not None:
                return schedule_view(updated)
        raise ScheduleChanged(schedule_id, "replaced")

    async def next_runs(self, tenant: str, schedule_id: str, n: int) -> NextRuns:
        """The next `n` (1..100) run times as the scheduler will fire them: from the stored
        `next_run_at_ms`, each following one computed with the same timing and run count. A paused
        schedule lists none (resume recomputes from then). Overlap skips cannot be foreseen."""
        doc = await self._doc(tenant, schedule_id)
        view = schedule_view(doc)
        runs: list[int] = []
        due = doc.get("next_run_at_ms")
        if not doc.get("paused") and isinstance(due, int):
            timing = timing_of(doc)
            anchor_ms = int(doc.get("anchor_ms") or due)
            done = int(doc.get("total_runs", 0))
            while due is not None and len(runs) < n:
                runs.append(due)
                due = timing.next_run_ms(due, anchor_ms=anchor_ms, runs_done=done + len(runs))
        return NextRuns(schedule_id=schedule_id, state=view.state, runs=[clock.from_ms(ms) for ms in runs])

    async def delete_many(self, tenant: str, schedule_ids: Sequence[str]) -> BatchDeleted:
        """Delete each of the tenant's schedules named (the jobs they fired stay); unknown ids are
        listed in `not_found`, never an error."""
        wanted: Sequence[str] = tuple(dict.fromkeys(schedule_ids))
        found = [d["_id"] async for d in self.db[SCHEDULES].find({"_id": {"$in": [*wanted]}, "tenant": tenant}, {"_id": 1})]
        deleted: Sequence[str] = ()
        for schedule_id in found:
            result = await self.db[SCHEDULES].delete_one({"_id": schedule_id, "tenant": tenant})
            if result.deleted_count:
                deleted = (*deleted, schedule_id)
        logger.info("%d schedules deleted for tenant %s", len(deleted), tenant)
        return BatchDeleted(deleted=[*deleted], not_found=[i for i in wanted if i not in deleted])

    async def delete(self, tenant: str, schedule_id: str) -> None:
        result = await self.db[SCHEDULES].delete_one({"_id": schedule_id, "tenant": tenant})
        if result.deleted_count == 0:
            raise ScheduleNotFound(schedule_id)
        logger.info("schedule %s deleted (the jobs it fired stay)", schedule_id)

    async def pause(self, tenant: str, schedule_id: str) -> ScheduleView:
        doc = await self.db[SCHEDULES].find_one_and_update(
            {"_id": schedule_id, "tenant": tenant},
            {"$set": {"paused": True, "updated_at_ms": clock.now_ms()}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise ScheduleNotFound(schedule_id)
        return schedule_view(doc)

    async def resume(self, tenant: str, schedule_id: str) -> ScheduleView:
        """Runs missed while paused are skipped: the next run is the first one after now."""
        for _ in range(_RACE_RETRIES):
            doc = await self._doc(tenant, schedule_id)
            now_ms = clock.now_ms()
            timing = timing_of(doc)
            fields = {"paused": False, "updated_at_ms": now_ms}
            fields.update(_next_run(timing, now_ms, int(doc.get("anchor_ms") or now_ms), int(doc.get("total_runs", 0))))
            updated = await self._swap(doc, fields)
            if updated is not None:
                return schedule_view(updated)
        raise ScheduleChanged(schedule_id, "resumed")

    async def trigger(self, tenant: str, schedule_id: str, idempotency_key: str | None) -> TriggerAccepted:
        """Submit the schedule's job now (a manual run). Raises `ScheduleNotFound`, `Conflict` (an
        identical job is not finished yet) and `IdempotencyConflict`."""
        doc = await self._doc(tenant, schedule_id)
        job_spec = JOB_SPEC_ADAPTER.validate_python(doc["job"])
        key = f"schedule:{schedule_id}:manual:{idempotency_key or uuid.uuid4().hex}"
        try:
            submission = await self.jobs.submit(job_spec, tenant, key, schedule_id=schedule_id)
        except DuplicateJob as error:  # the spec is the schedule's: the schedule is what is at fault
            raise Conflict(str(error), schedule_id) from None
        if submission.created:
            now_ms = clock.now_ms()
            await self.db[SCHEDULES].update_one(
                {"_id": schedule_id, "tenant": tenant},
                {"$inc": {"manual_runs": 1}, "$set": {"last_job_id": submission.job_id, "last_manual_run_at_ms": now_ms}},
            )
        return TriggerAccepted(
            job_id=submission.job_id, schedule_id=schedule_id, created=submission.created, url=f"/v1/jobs/{submission.job_id}"
        )

    async def _swap(self, doc: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any] | None:
        """Write `fields` unless the scheduler claimed a run since `doc` was read."""
        return await self.db[SCHEDULES].find_one_and_update(
            {
                "_id": doc["_id"],
                "tenant": doc["tenant"],
                "next_run_at_ms": doc.get("next_run_at_ms"),
                "total_runs": doc.get("total_runs", 0),
            },
            {"$set": fields},
            return_document=ReturnDocument.AFTER,
        )

    async def _doc(self, tenant: str, schedule_id: str) -> dict[str, Any]:
        doc = await self.db[SCHEDULES].find_one({"_id": schedule_id, "tenant": tenant})
        if doc is None:
            raise ScheduleNotFound(schedule_id)
        return doc
