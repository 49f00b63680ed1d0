"""The gateway's job logic: record, publish, report. Collaborators come in as arguments."""

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from fastapi.exceptions import RequestValidationError
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts.jobs import JobSpec, MongoRangeJobSpec
from cairn_contracts.messages import StartJob
from cairn_contracts.states import JobState, ShardState
from cairn_contracts.store import CHECKPOINTS, JOBS, SHARDS, STATUS_CACHE_KEY, JobRecord
from cairn_contracts.store import spec_fingerprint as store_spec_fingerprint
from cairn_contracts.topology import EXCHANGE_COMMANDS, ROUTING_START_JOB
from cairn_gateway.degraded import REDIS_UNAVAILABLE, fell_back
from cairn_gateway.failures import failed_shards, retrying_shards
from cairn_gateway.joblock import JobLocks
from cairn_gateway.schemas import ShardCounts, TaskResult, TaskStatus
from cairn_runtime.amqp import PublishNotConfirmed, Publisher
from cairn_runtime.tracing import describe_work

logger = logging.getLogger(__name__)


class JobNotFound(Exception):
    pass


class JobStillRunning(Exception):
    def __init__(self, state: str) -> None:
        super().__init__(f"the job is {state}; its result exists once it is SUCCESS or FAILURE")


class ResultExpired(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"the result of job {job_id} has expired (results are kept CAIRN_RESULT_TTL_S after the job finished)")


class IdempotencyConflict(Exception):
    pass


@dataclass(frozen=True)
class Submission:
    job_id: str
    state: JobState
    created: bool


def spec_fingerprint(spec: JobSpec) -> str:
    return store_spec_fingerprint(spec)


def utcnow() -> datetime:
    return datetime.now(UTC)


async def check_source(sources: AsyncDatabase, spec: JobSpec) -> None:
    """Refuse (422 on `params.collection`) a mongo_range job whose source collection does not
    exist in `sources`, the database the workers read (`CAIRN_SOURCE_DATABASE`, default Cairn's):
    read, it would look like an empty source. The one place that decides where a job's source is
    looked up. A collection dropped after this check fails the job in the worker instead."""
    if not isinstance(spec, MongoRangeJobSpec):
        return
    name = spec.params.collection
    # The membership test keeps the answer right where a server ignores the filter (nx-27017).
    if name in await sources.list_collection_names(filter={"name": name}):
        return
    raise RequestValidationError(
        [
            {
                "loc": ("body", "params", "collection"),
                "msg": f"source collection {name!r} does not exist in database {sources.name!r}",
                "type": "source_not_found",
                "input": name,
            }
        ]
    )


@dataclass(frozen=True)
class JobService:
    db: AsyncDatabase
    publisher: Publisher
    cache: aioredis.Redis
    cache_prefix: str
    cache_ttl_s: int
    locks: JobLocks | None = None  # the Redis lock per job fingerprint (None: no lock)
    sources: AsyncDatabase | None = None  # where mongo_range sources are (None: `db`, as the workers' default)

    async def submit(
        self, spec: JobSpec, tenant: str, idempotency_key: str | None, *, schedule_id: str | None = None
    ) -> Submission:
        """Record the job, then publish its command with a confirm.

        Accepted means recorded: if the broker does not confirm, the job stays PENDING with no
        `command_published_at`, and the scheduler's relay publishes it once the broker is back.

        Duplicates, two layers (joblock.py): the same tenant and Idempotency-Key give the same job
        (the unique index; its id derives from the key, so concurrent identical requests race for
        one document), and a job identical to an unfinished one is refused (`DuplicateJob`, the
        Redis lock per spec fingerprint).
        """
        record = JobRecord.new(spec, tenant, idempotency_key=idempotency_key, schedule_id=schedule_id)
        describe_work(job_id=record.id, tenant=tenant, pipeline=spec.pipeline)  # span + log context
        if idempotency_key is not None:
            existing = await self.db[JOBS].find_one({"tenant": tenant, "idempotency_key": idempotency_key})
            if existing is not None:
                return self._same_job(existing, record)
        await check_source(self.sources if self.sources is not None else self.db, spec)
        lock = await self.locks.acquire(tenant, record.spec_fingerprint, record.id) if self.locks else None
        try:
            await self.db[JOBS].insert_one(record.to_document())
        except DuplicateKeyError:
            existing = await self.db[JOBS].find_one({"tenant": tenant, "idempotency_key": idempotency_key})
            if existing is None:  # the unique key is ours only if the tenant/key matched
                raise
            if self.locks and lock:
                same = existing["_id"] == record.id and existing.get("spec_fingerprint") == record.spec_fingerprint
                if not same or JobState(existing["state"]).is_terminal:
                    await self.locks.release(lock)  # the lock we took names no unfinished job
            return self._same_job(existing, record)
        except BaseException:
            if self.locks and lock:
                await self.locks.release(lock)
            raise
        if self.locks and lock:
            await self.locks.hold(lock)
        logger.info("job %s recorded PENDING (tenant %s, pipeline %s, %s)", record.id, tenant, spec.pipeline, spec.sharding.strategy)
        await self._publish_start(record.id, tenant, spec)
        return Submission(record.id, JobState.PENDING, created=True)

    @staticmethod
    def _same_job(existing: dict[str, Any], record: JobRecord) -> Submission:
        if existing.get("spec_fingerprint") != record.spec_fingerprint:
            raise IdempotencyConflict(
                f"Idempotency-Key {record.idempotency_key!r} was used for a different job ({existing['_id']})"
            )
        return Submission(existing["_id"], JobState(existing["state"]), created=False)

    async def _publish_start(self, job_id: str, tenant: str, spec: JobSpec) -> None:
        command = StartJob(job_id=job_id, tenant=tenant, spec=spec)
        try:
            await self.publisher.publish(
                EXCHANGE_COMMANDS, ROUTING_START_JOB, command, priority=int(spec.priority), correlation_id=job_id
            )
        except PublishNotConfirmed:
            logger.warning("job %s recorded; its command was not confirmed and will be relayed", job_id, exc_info=True)
            return
        await self.db[JOBS].update_one({"_id": job_id}, {"$set": {"command_published_at": utcnow()}})
        logger.info("job %s: StartJob published to the scheduler (confirmed)", job_id)

    async def status(self, job_id: str, tenant: str) -> TaskStatus:
        """The job's status: a finished job's from the Redis cache, else (or with Redis away) from MongoDB."""
        cache_key = STATUS_CACHE_KEY.format(prefix=self.cache_prefix, tenant=tenant, job_id=job_id)
        cached = await self._cached(cache_key)
        if cached is not None:
            return TaskStatus.model_validate_json(cached)
        job = await self._job(job_id, tenant)
        states = Counter([s["state"] async for s in self.db[SHARDS].find({"job_id": job_id}, {"state": 1})])
        done_weight = total_weight = 0.0
        records_done = 0
        async for checkpoint in self.db[CHECKPOINTS].find(
            {"job_id": job_id}, {"cursor": 1, "range_start": 1, "range_end": 1, "records_estimate": 1, "records_done": 1}
        ):
            # Each shard's share of its key range, weighted by its expected records: hash-mod
            # shards each scan the whole range, range shards their own part of it.
            span = max(1, int(checkpoint["range_end"]) - int(checkpoint["range_start"]))
            weight = float(checkpoint.get("records_estimate", span))
            done_weight += weight * (int(checkpoint["cursor"]) - int(checkpoint["range_start"])) / span
            total_weight += weight
            records_done += int(checkpoint.get("records_done", 0))
        total = job.get("records_total")
        state = JobState(job["state"])
        if job.get("cancel_requested") and not state.is_terminal:
            state = JobState.CANCELLING  # reported, never stored: the running shards are stopping
        if state == JobState.SUCCESS:
            progress = 100.0
        else:
            progress = round(100.0 * done_weight / total_weight, 2) if total_weight else 0.0
        status = TaskStatus(
            task_id=job_id,
            state=state,
            progress=progress,
            records_done=records_done,
            records_total=total,
            shards=ShardCounts(total=job.get("shard_count", 0), **{k.lower(): v for k, v in states.items()}),
            pipeline=job["pipeline"],
            name=job.get("name"),
            priority=job["priority"],
            created_at=job["created_at"],
            started_at=job.get("started_at"),
            finished_at=job.get("finished_at"),
            retrying=await retrying_shards(self.db, job_id) if states.get(ShardState.RETRY) else [],
            failed_shards=await failed_shards(self.db, job_id) if states.get(ShardState.FAILED) else [],
            dead_letters_url=f"/dlq/entries?job_id={job_id}" if states.get(ShardState.FAILED) else None,
        )
        if state.is_terminal and self.cache_ttl_s:
            # Only finished jobs are cached: their status can no longer change.
            try:
                await self.cache.set(cache_key, status.model_dump_json(), ex=self.cache_ttl_s)
            except REDIS_UNAVAILABLE as error:
                fell_back("redis", "status_cache", error, "job status is read from MongoDB")
        return status

    async def _cached(self, cache_key: str) -> bytes | None:
        """The cached status, or None if absent or Redis does not answer (MongoDB has the truth)."""
        try:
            return await self.cache.get(cache_key)
        except REDIS_UNAVAILABLE as error:
            fell_back("redis", "status_cache", error, "job status is read from MongoDB")
            return None

    async def result(self, job_id: str, tenant: str) -> TaskResult:
        job = await self._job(job_id, tenant)
        state = JobState(job["state"])
        if not state.is_terminal:
            raise JobStillRunning(state)
        if job.get("result_expired"):
            raise ResultExpired(job_id)
        return TaskResult(task_id=job_id, state=state, result=job.get("result") or {}, finished_at=job.get("finished_at"))

    async def _job(self, job_id: str, tenant: str) -> dict[str, Any]:
        job = await self.db[JOBS].find_one({"_id": job_id, "tenant": tenant})
        if job is None:
            raise JobNotFound(job_id)
        return job
