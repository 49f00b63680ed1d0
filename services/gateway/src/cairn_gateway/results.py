"""Finished jobs as results: the paged list `GET /v1/results` and batch deletes.

A result is a finished job (SUCCESS, FAILURE, CANCELLED) with its result summary (kept
`result_ttl_s`), its runtime, its failed shards (the error and a traceback summary from the dead
letter each failed shard left in `task_errors`) and the workers that ran its shards, as far as
the shards recorded them (`ran_by`, else `taken_by`; a shard that finished before workers
recorded it names none).

Pages are newest first by creation time (`created_at_ms`, `_id`), the same opaque cursor as
`GET /v1/jobs`, so a page never skips or repeats a job whatever finishes meanwhile.
"""

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts import clock
from cairn_contracts.states import TERMINAL_JOB_STATES, JobState, ShardState, state_values
from cairn_contracts.store import JOBS, SHARDS, TASK_ERRORS
from cairn_gateway.errors import Conflict, NotFound
from cairn_gateway.jobs import JobService, after_cursor, encode_cursor, result_expiry_ms
from cairn_gateway.jobs_schemas import BatchDelete, BatchDeleted
from cairn_gateway.schemas import UtcDatetime

logger = logging.getLogger(__name__)

# Failed shards listed per result (a job may have a thousand): the count says how many there are.
MAX_FAILED_SHARDS = 20
TRACEBACK_LINES = 4
TRACEBACK_CHARS = 600


class FailedShard(BaseModel):
    shard_key: str
    index: int | None = None
    attempts: int = 0
    error: str | None = Field(None, description="The shard's last error")
    error_type: str | None = Field(None, description="The exception's class (from its dead letter)")
    traceback: str | None = Field(None, description=f"The last {TRACEBACK_LINES} lines of the stack, at most {TRACEBACK_CHARS} characters")
    dead_letter_id: str | None = None
    worker: str | None = Field(None, description="The worker that ran it last, if recorded")


class ResultItem(BaseModel):
    id: str
    name: str | None = None
    pipeline: str
    state: JobState
    schedule_id: str | None = None
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    runtime_s: float | None = Field(None, description="finished_at - started_at (created_at when it never started), seconds")
    result: dict[str, Any] | None = Field(None, description="The result summary; null once expired or deleted")
    result_expired: bool = False
    shard_count: int | None = None
    failed_shard_count: int = 0
    failed_shards: list[FailedShard] = Field(description=f"At most {MAX_FAILED_SHARDS}, in shard order")
    workers: list[str] = Field(description="Workers recorded as having run its shards, sorted")
    url: str


class ResultPage(BaseModel):
    items: list[ResultItem]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last one")
    limit: int


class ResultsBatchDelete(BatchDelete):
    scope: Literal["result", "job"] = Field(
        "result", description="result: drop the result summary (the job stays, its result answers 410); job: delete the job, its shards and checkpoints"
    )


def traceback_summary(stack: Any) -> str | None:
    """The last TRACEBACK_LINES non-blank lines of a formatted stack (the raise site and the
    exception line), at most TRACEBACK_CHARS characters; None without a stack."""
    if not isinstance(stack, str) or not stack.strip():
        return None
    lines = [line.rstrip() for line in stack.splitlines() if line.strip()]
    return "\n".join(lines[-TRACEBACK_LINES:])[-TRACEBACK_CHARS:]


def runtime_s(job: dict[str, Any]) -> float | None:
    finished = clock.stored_ms(job.get("finished_at"))
    if isinstance(job.get("finished_at_ms"), int):
        finished = job["finished_at_ms"]
    started = clock.stored_ms(job.get("started_at")) or clock.stored_ms(job.get("created_at"))
    if finished is None or started is None:
        return None
    return max(0.0, (finished - started) / 1000)


@dataclass(frozen=True)
class ResultService:
    db: AsyncDatabase
    jobs: JobService

    async def page(self, tenant: str, limit: int, cursor: str | None, state: JobState | None = None) -> ResultPage:
        """The tenant's finished jobs, newest first; `state` narrows to one terminal state.
        Raises `InvalidCursor` (422 naming `cursor`)."""
        states = [str(state)] if state is not None else state_values(TERMINAL_JOB_STATES)
        query = after_cursor({"tenant": tenant, "state": {"$in": states}}, cursor)
        found = self.db[JOBS].find(query).sort([("created_at_ms", -1), ("_id", -1)]).limit(limit + 1)
        docs = [doc async for doc in found]
        more = len(docs) > limit
        docs = docs[:limit]
        shards = await self._shards_of([doc["_id"] for doc in docs])
        letters = await self._dead_letters([shard for found in shards.values() for shard in found["failed"]])
        items = [self._item(doc, shards.get(doc["_id"], _no_shards()), letters) for doc in docs]
        return ResultPage(items=items, next_cursor=encode_cursor(docs[-1]) if more and docs else None, limit=limit)

    async def _shards_of(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Per job of the page: `workers` (set), `failed` (up to MAX_FAILED_SHARDS shard
        documents, in shard order) and `failed_count`. One query for the whole page, projected to
        the few fields read (outside any hot path; see docs/mongodb-stand-in.md)."""
        found: dict[str, dict[str, Any]] = {job_id: _no_shards() for job_id in job_ids}
        if not job_ids:
            return found
        projection = {"job_id": 1, "shard_key": 1, "index": 1, "state": 1, "attempts": 1, "last_error": 1, "dead_letter_id": 1, "ran_by": 1, "taken_by": 1}
        async for shard in self.db[SHARDS].find({"job_id": {"$in": job_ids}}, projection).sort([("job_id", 1), ("index", 1)]):
            entry = found.get(shard.get("job_id"))
            if entry is None:
                continue
            worker = shard.get("ran_by") or shard.get("taken_by")
            if isinstance(worker, str):
                entry["workers"].add(worker)
            if shard.get("state") == ShardState.FAILED:
                entry["failed_count"] += 1
                if len(entry["failed"]) < MAX_FAILED_SHARDS:
                    entry["failed"].append(shard)
        return found

    def _item(self, job: dict[str, Any], shards: dict[str, Any], letters: dict[str, dict[str, Any]]) -> ResultItem:
        job_id = job["_id"]
        expires_ms = result_expiry_ms(job, self.jobs.result_ttl_s)
        expired = bool(job.get("result_expired")) or (expires_ms is not None and expires_ms <= clock.now_ms())
        return ResultItem(
            id=job_id,
            name=job.get("name"),
            pipeline=job["pipeline"],
            state=JobState(job["state"]),
            schedule_id=job.get("schedule_id"),
            created_at=job["created_at"],
            started_at=job.get("started_at"),
            finished_at=job.get("finished_at"),
            runtime_s=runtime_s(job),
            result=None if expired else job.get("result") or {},
            result_expired=expired,
            shard_count=job.get("shard_count"),
            failed_shard_count=shards["failed_count"],
            failed_shards=[self._failed(shard, letters) for shard in shards["failed"]],
            workers=sorted(shards["workers"]),
            url=f"/v1/jobs/{job_id}",
        )

    async def _dead_letters(self, shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The newest dead letter of each failed shard, by shard key (one query)."""
        if not shards:
            return {}
        letters: dict[str, dict[str, Any]] = {}
        projection = {"shard_key": 1, "error_type": 1, "error_message": 1, "stack": 1, "created_at": 1}
        keys = [s["shard_key"] for s in shards]
        async for letter in self.db[TASK_ERRORS].find({"shard_key": {"$in": keys}}, projection).sort("created_at", 1):
            letters[letter["shard_key"]] = letter  # ascending: the newest wins
        return letters

    @staticmethod
    def _failed(shard: dict[str, Any], letters: dict[str, dict[str, Any]]) -> FailedShard:
        letter = letters.get(shard["shard_key"], {})
        error = shard.get("last_error") or letter.get("error_message")
        worker = shard.get("ran_by") or shard.get("taken_by")
        return FailedShard(
            shard_key=shard["shard_key"],
            index=shard.get("index"),
            attempts=int(shard.get("attempts", 0)),
            error=str(error)[:1000] if error is not None else None,
            error_type=letter.get("error_type"),
            traceback=traceback_summary(letter.get("stack")),
            dead_letter_id=shard.get("dead_letter_id") or letter.get("_id"),
            worker=worker if isinstance(worker, str) else None,
        )

    async def delete_many(self, tenant: str, body: ResultsBatchDelete) -> BatchDeleted:
        """Delete the result (scope `result`) or the whole job (scope `job`) of each finished job
        named. Unknown ids go to `not_found`, unfinished jobs to `refused`; never an error. Each
        delete is one conditional write on the job being finished, so a job that is reopened
        meanwhile (a DLQ replay) is refused rather than half-deleted."""
        deleted: list[str] = []
        not_found: list[str] = []
        refused: dict[str, str] = {}
        for job_id in dict.fromkeys(body.ids):
            try:
                if body.scope == "job":
                    await self.jobs.delete(tenant, job_id)
                else:
                    await self._drop_result(tenant, job_id)
                deleted.append(job_id)
            except NotFound:
                not_found.append(job_id)
            except Conflict as error:
                refused[job_id] = str(error)
        logger.info("batch delete (%s) for tenant %s: %d deleted, %d refused", body.scope, tenant, len(deleted), len(refused))
        return BatchDeleted(deleted=deleted, not_found=not_found, refused=refused)

    async def _drop_result(self, tenant: str, job_id: str) -> None:
        dropped = await self.db[JOBS].update_one(
            {"_id": job_id, "tenant": tenant, "state": {"$in": state_values(TERMINAL_JOB_STATES)}},
            {"$unset": {"result": ""}, "$set": {"result_expired": True, "result_deleted_at_ms": clock.now_ms()}},
        )
        if dropped.matched_count:
            return
        job = await self.db[JOBS].find_one({"_id": job_id, "tenant": tenant}, {"state": 1})
        if job is None:
            raise NotFound(f"no job {job_id}", job_id)
        raise Conflict(f"job {job_id} is {job['state']}: only a finished job has a result to delete", job_id)


def _no_shards() -> dict[str, Any]:
    return {"workers": set(), "failed": [], "failed_count": 0}
