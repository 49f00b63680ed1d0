"""The versioned jobs resource: list, read, count, cancel, delete and results with retention.

Every query carries the caller's tenant, so another tenant's job answers 404 exactly like one that
does not exist. Creating a job is `JobService.submit` (jobs.py), shared with `/task/start`.

Listing is newest first with an opaque cursor over (created_at_ms, _id): stable under inserts,
and integer timestamps compare the same on every server (docs/mongodb-stand-in.md).
"""

import base64
import binascii
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.bounds import INT64_MAX, check_storable
from cairn_contracts.messages import CancelJob
from cairn_contracts.states import TERMINAL_JOB_STATES, JobState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS, STATUS_CACHE_KEY
from cairn_contracts.topology import EXCHANGE_COMMANDS, ROUTING_CANCEL_JOB
from cairn_gateway.joblock import JobLocks
from cairn_gateway.problems import ApiError, invalid, not_found
from cairn_gateway.jobs_schemas import JobCounts, JobDetail, JobPage, JobResultBody, JobSummary, ShardView
from cairn_runtime.amqp import PublishNotConfirmed, Publisher
from cairn_runtime.tracing import describe_work

logger = logging.getLogger(__name__)

ACTIVE = [JobState.PENDING, JobState.STARTED, JobState.RETRY]
TERMINAL = [str(s) for s in TERMINAL_JOB_STATES]
_SUMMARY = {"spec": 0, "result": 0, "shard_states": 0}


def epoch_ms() -> int:
    return int(time.time() * 1000)


def moment_ms(value: Any) -> int | None:
    """A stored moment in epoch ms, whatever form the server kept it in (date, text or ms)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp() * 1000)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)
    return None


def view_state(job: dict[str, Any]) -> JobState:
    state = JobState(job["state"])
    if job.get("cancel_requested") and not state.is_terminal:
        return JobState.CANCELLING
    return state


def state_query(state: JobState) -> dict[str, Any]:
    if state == JobState.CANCELLING:
        return {"cancel_requested": True, "state": {"$in": [str(s) for s in ACTIVE]}}
    if state in ACTIVE:
        return {"state": str(state), "cancel_requested": {"$in": [False, None]}}
    return {"state": str(state)}


def encode_cursor(job: dict[str, Any]) -> str:
    raw = json.dumps([int(job.get("created_at_ms") or 0), job["_id"]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(created_at_ms, _id) of the last item of the previous page; 422 on `cursor` for anything
    this API cannot have given out (a hand-made one must not reach the store: int64, UTF-8)."""
    try:
        created_ms, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(created_ms, int) or isinstance(created_ms, bool) or not 0 <= created_ms <= INT64_MAX:
            raise ValueError
        if not isinstance(job_id, str) or len(job_id) > 200:
            raise ValueError
        check_storable(job_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise invalid("not a cursor this API gave out", ["query", "cursor"]) from None
    return created_ms, job_id


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    pipeline: str | None = None
    priority: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    q: str | None = None
    schedule_id: str | None = None

    def query(self, tenant: str) -> dict[str, Any]:
        query: dict[str, Any] = {"tenant": tenant}
        if self.state is not None:
            query.update(state_query(self.state))
        for field in ("pipeline", "priority", "schedule_id"):
            if (value := getattr(self, field)) is not None:
                query[field] = value
        created: dict[str, int] = {}
        if self.created_after is not None:
            created["$gte"] = moment_ms(self.created_after) or 0
        if self.created_before is not None:
            created["$lt"] = moment_ms(self.created_before) or 0
        if created:
            query["created_at_ms"] = created
        if self.q:
            # Case-insensitive substring of the name; the text is escaped, never a pattern.
            query["name"] = {"$regex": re.escape(self.q), "$options": "i"}
        return query


def summary(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job["_id"],
        "name": job.get("name"),
        "pipeline": job["pipeline"],
        "priority": int(job["priority"]),
        "state": view_state(job),
        "created_at": job["created_at"],
        "started_at": job.get("started_at"),
        "finished_at": job.get("finished_at"),
        "shard_count": job.get("shard_count"),
        "records_total": job.get("records_total"),
        "idempotency_key": job.get("idempotency_key"),
        "schedule_id": job.get("schedule_id"),
        "cancel_requested": bool(job.get("cancel_requested")),
        "url": f"/v1/jobs/{job['_id']}",
    }


@dataclass(frozen=True)
class JobDirectory:
    db: AsyncDatabase
    publisher: Publisher
    cache: aioredis.Redis
    cache_prefix: str
    result_ttl_s: int
    locks: JobLocks | None = None

    async def list(self, tenant: str, job_filter: JobFilter, limit: int, cursor: str | None) -> JobPage:
        query = job_filter.query(tenant)
        if cursor:
            created_ms, job_id = decode_cursor(cursor)
            query = {
                "$and": [
                    query,
                    {"$or": [{"created_at_ms": {"$lt": created_ms}}, {"created_at_ms": created_ms, "_id": {"$lt": job_id}}]},
                ]
            }
        found = self.db[JOBS].find(query, _SUMMARY).sort([("created_at_ms", -1), ("_id", -1)]).limit(limit + 1)
        jobs = [job async for job in found]
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(
            items=[JobSummary.model_validate(summary(job)) for job in jobs],
            next_cursor=encode_cursor(jobs[-1]) if more and jobs else None,
            limit=limit,
        )

    async def counts(self, tenant: str) -> JobCounts:
        stored: Counter[str] = Counter()
        async for row in await self.db[JOBS].aggregate([{"$match": {"tenant": tenant}}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]):
            stored[str(row["_id"])] += int(row["n"])
        cancelling: Counter[str] = Counter()
        async for job in self.db[JOBS].find(state_query(JobState.CANCELLING) | {"tenant": tenant}, {"state": 1}):
            cancelling[job["state"]] += 1
        counts = {str(s): stored.get(str(s), 0) - cancelling.get(str(s), 0) for s in JobState}
        counts[JobState.CANCELLING] = sum(cancelling.values())
        return JobCounts(counts=counts, total=sum(stored.values()))

    async def get(self, tenant: str, job_id: str, shard_limit: int) -> JobDetail:
        job = await self._job(tenant, job_id)
        checkpoints = {c["shard_key"]: c async for c in self.db[CHECKPOINTS].find({"job_id": job_id})}
        shards = [
            s async for s in self.db[SHARDS].find({"job_id": job_id}).sort([("index", 1), ("task_key", 1)]).limit(shard_limit + 1)
        ]
        truncated = len(shards) > shard_limit
        views = []
        for shard in shards[:shard_limit]:
            checkpoint = checkpoints.get(shard["task_key"], {})
            views.append(
                ShardView(
                    shard_key=shard["task_key"],
                    index=shard.get("index"),
                    state=shard["state"],
                    attempts=int(shard.get("attempts", 0)),
                    range_start=shard.get("range_start"),
                    range_end=shard.get("range_end"),
                    cursor=checkpoint.get("cursor"),
                    records_done=int(checkpoint.get("records_done", 0)),
                    records_written=int(checkpoint.get("records_written", 0)),
                    started_at=shard.get("started_at"),
                    finished_at=shard.get("finished_at"),
                    last_error=shard.get("last_error"),
                )
            )
        done_weight = total_weight = 0.0
        for checkpoint in checkpoints.values():
            span = max(1, int(checkpoint["range_end"]) - int(checkpoint["range_start"]))
            weight = float(checkpoint.get("records_estimate", span))
            done_weight += weight * (int(checkpoint["cursor"]) - int(checkpoint["range_start"])) / span
            total_weight += weight
        state = JobState(job["state"])
        progress = 100.0 if state == JobState.SUCCESS else (round(100.0 * done_weight / total_weight, 2) if total_weight else 0.0)
        return JobDetail.model_validate(
            {
                **summary(job),
                "spec": job["spec"],
                "progress": progress,
                "records_done": sum(int(c.get("records_done", 0)) for c in checkpoints.values()),
                "shards": views,
                "shards_truncated": truncated,
            }
        )

    async def cancel(self, tenant: str, job_id: str, requested_by: str) -> JobSummary:
        """Mark the job, then ask the scheduler to stop it. 202 either way once it is marked: a
        command the broker did not confirm is made up for by the scheduler's cancel sweep.

        Raises ApiError 409 when the job has finished (SUCCESS, FAILURE or already CANCELLED):
        nothing can change, and the client is told so rather than given a 202 that means nothing.
        A job still CANCELLING is asked again (202): its stop is not finished."""
        describe_work(job_id=job_id, tenant=tenant)  # span + log context: `grep <job id>` finds the cancel
        now = datetime.now(UTC)
        job = await self.db[JOBS].find_one_and_update(
            {"_id": job_id, "tenant": tenant, "state": {"$in": [str(s) for s in ACTIVE]}},
            {
                "$set": {
                    "cancel_requested": True,
                    "cancel_requested_at": now,
                    "cancel_requested_at_ms": int(now.timestamp() * 1000),
                    "cancel_requested_by": requested_by,
                }
            },
            projection=_SUMMARY,
            return_document=ReturnDocument.AFTER,
        )
        if job is None:
            job = await self._job(tenant, job_id, _SUMMARY)
            if job["state"] == JobState.CANCELLED:
                raise ApiError(409, f"job {job_id} is already CANCELLED", ["path", "job_id"])
            raise ApiError(409, f"job {job_id} is {job['state']}: a finished job cannot be cancelled", ["path", "job_id"])
        try:
            await self.publisher.publish(
                EXCHANGE_COMMANDS,
                ROUTING_CANCEL_JOB,
                CancelJob(job_id=job_id, tenant=tenant, requested_by=requested_by),
                correlation_id=job_id,
            )
        except PublishNotConfirmed:
            logger.warning("cancel of job %s recorded; the command was not confirmed (the sweep will do it)", job_id, exc_info=True)
        logger.info("cancel of job %s requested by %s", job_id, requested_by)
        return JobSummary.model_validate(summary(job))

    async def delete(self, tenant: str, job_id: str) -> None:
        """A finished job, its shards and its checkpoints; the records it stored stay."""
        job = await self._job(tenant, job_id, {"state": 1, "tenant": 1, "spec_fingerprint": 1})
        if job["state"] not in TERMINAL:
            raise ApiError(409, f"job {job_id} is {job['state']}: only a finished job can be deleted (cancel it first)", ["path", "job_id"])
        # The job document goes last: until then a failed delete can simply be repeated.
        await self.db[SHARDS].delete_many({"job_id": job_id})
        await self.db[CHECKPOINTS].delete_many({"job_id": job_id})
        await self.db[JOBS].delete_one({"_id": job_id, "tenant": tenant, "state": {"$in": TERMINAL}})
        try:
            await self.cache.delete(STATUS_CACHE_KEY.format(prefix=self.cache_prefix, tenant=tenant, job_id=job_id))
        except Exception:
            logger.warning("cached status of deleted job %s not dropped", job_id, exc_info=True)
        if self.locks is not None:
            await self.locks.release_job(job)
        logger.info("job %s deleted", job_id)

    async def result(self, tenant: str, job_id: str) -> JobResultBody:
        job = await self._job(tenant, job_id)
        state = JobState(job["state"])
        if not state.is_terminal:
            raise ApiError(409, f"the job is {view_state(job)}; its result exists once it has finished", ["path", "job_id"])
        finished_ms = job.get("finished_at_ms") if isinstance(job.get("finished_at_ms"), int) else moment_ms(job.get("finished_at"))
        expires_ms = finished_ms + self.result_ttl_s * 1000 if finished_ms is not None else None
        if job.get("result_expired") or (expires_ms is not None and expires_ms <= epoch_ms()):
            raise ApiError(410, f"the result of job {job_id} has expired (kept {self.result_ttl_s} s after the job finished)", ["path", "job_id"])
        return JobResultBody(
            id=job_id,
            state=state,
            result=job.get("result") or {},
            finished_at=job.get("finished_at"),
            expires_at=datetime.fromtimestamp(expires_ms / 1000, UTC) if expires_ms is not None else None,
        )

    async def _job(self, tenant: str, job_id: str, projection: dict[str, int] | None = None) -> dict[str, Any]:
        job = await self.db[JOBS].find_one({"_id": job_id, "tenant": tenant}, projection)
        if job is None:
            raise not_found("job", job_id, "job_id")
        return job
