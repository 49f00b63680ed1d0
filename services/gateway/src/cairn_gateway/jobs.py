"""The gateway's job service: submit, report (status, list, counts, detail), cancel, delete and
results, for `/task/*` and `/v1/jobs` alike. Collaborators come in as arguments (app.py wires them).

The one definition of a job's progress (`progress`), of its reported state (`view_state`) and of
when its result expires (`result_expiry_ms`) is here; both APIs read them through `JobService`.

Every query carries the caller's tenant, so another tenant's job raises `JobNotFound` exactly like
one that does not exist. Errors are domain errors (errors.py); problems.py answers them.

Listing is newest first with an opaque cursor over (created_at_ms, _id): stable under inserts,
and integer timestamps compare the same on every server (docs/mongodb-stand-in.md).
"""

import base64
import binascii
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.bounds import INT64_MAX, check_storable
from cairn_contracts.jobs import JobSpec
from cairn_contracts.messages import CancelJob, StartJob
from cairn_contracts.pipelines import MONGO_RANGE
from cairn_contracts.sinks import WRITE_COUNTERS
from cairn_contracts.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, JobState, ShardState, state_values
from cairn_contracts.store import CHECKPOINTS, DEFAULT_TENANT, JOB_TALLIES, JOBS, SHARDS, STATUS_CACHE_KEY, JobRecord
from cairn_contracts.tenancy import job_demand
from cairn_gateway.auth import ALL_TENANTS, tenant_match
from cairn_gateway.catalog import check_spec
from cairn_gateway.degraded import REDIS_UNAVAILABLE, fell_back
from cairn_gateway.errors import Conflict, Gone, Invalid, NotFound
from cairn_gateway.failures import failed_shards, retrying_shards
from cairn_gateway.joblock import JobLocks
from cairn_gateway.jobs_schemas import JobCounts, JobDetail, JobPage, JobResultBody, JobSummary, ShardView
from cairn_gateway.schemas import ShardCounts, TaskStatus, Writes
from cairn_gateway.tenants import JobSize, TenantService
from cairn_runtime import tally
from cairn_runtime.amqp import Publisher, PublishNotConfirmed
from cairn_runtime.tracing import describe_work

logger = logging.getLogger(__name__)

_SUMMARY = {"spec": 0, "result": 0, "shard_states": 0, tally.LEDGER: 0}
_STATUS = {"spec": 0, tally.LEDGER: 0}  # one job document: never its shards (the ledger is for the scheduler)
_PROGRESS_FIELDS = {"position": 1, "done": 1, "cursor": 1, "range_start": 1, "range_end": 1, "records_estimate": 1, "records_done": 1, **dict.fromkeys(WRITE_COUNTERS, 1)}
_ACTIVE_SHARD_STATES = (ShardState.RUNNING, ShardState.RETRY, ShardState.QUEUED, ShardState.PLANNED)


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id}", job_id)


class JobStillRunning(Conflict):
    """A result asked of a job that has not finished."""

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"the job is {state}; its result exists once it has finished", job_id)


class JobFinished(Conflict):
    """A cancel of a finished job, or a delete of an unfinished one: the state forbids it."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(detail, job_id)


class ResultExpired(Gone):
    def __init__(self, job_id: str, ttl_s: int) -> None:
        super().__init__(f"the result of job {job_id} has expired (kept {ttl_s} s after the job finished)", job_id)


class IdempotencyConflict(Conflict):
    """An Idempotency-Key reused for a different job spec."""

    at = ("header", "Idempotency-Key")


class InvalidCursor(Invalid):
    def __init__(self, at: tuple[str | int, ...] = ("query", "cursor")) -> None:
        super().__init__("not a cursor this API gave out", at)


class SourceNotFound(Invalid):
    """A mongo_range job whose source collection does not exist."""

    def __init__(self, collection: str, database: str, at: tuple[str | int, ...] = ("body",)) -> None:
        super().__init__(
            f"source collection {collection!r} does not exist in database {database!r}",
            (*at, "params", "collection"),
            kind="source_not_found",
            value=collection,
        )


class UnknownDependency(Invalid):
    """An `after` id that names no job of the tenant (unknown, or another tenant's)."""

    def __init__(self, job_id: str, at: tuple[str | int, ...]) -> None:
        super().__init__(f"no job {job_id} of this tenant to wait for", at, kind="unknown_dependency", value=job_id)


class NoDependency(Invalid):
    """`params_from` on a job that waits for nothing: there is no job to read params from."""

    def __init__(self, at: tuple[str | int, ...]) -> None:
        super().__init__("params_from reads the job's first dependency: name one in `after`", at, kind="params_from_without_after")


async def check_dependencies(db: AsyncDatabase, tenant: str, after: list[str], at: tuple[str | int, ...]) -> None:
    """Every id of `after` names a job of `tenant`, else `Invalid` listing each one that does not,
    at `(*at, i)`. Only recorded jobs can be named, so a dependency cycle cannot be built."""
    if not after:
        return
    found = {job["_id"] async for job in db[JOBS].find({"_id": {"$in": list(after)}, "tenant": tenant}, {"_id": 1})}
    missing = [UnknownDependency(job_id, (*at, index)).errors[0] for index, job_id in enumerate(after) if job_id not in found]
    if missing:
        raise Invalid.of(missing)


@dataclass(frozen=True)
class Submission:
    job_id: str
    state: JobState
    created: bool


async def check_source(
    tenants: TenantService, tenant: str, spec: JobSpec, at: tuple[str | int, ...] = ("body",), *, must_exist: bool = True
) -> None:
    """Refuse a mongo_range job whose source the tenant may not read (`Invalid` on
    `(*at, "params", "database")`: a database not granted to it) or that does not exist (`SourceNotFound`;
    read, it would look like an empty source). A job reads its tenant's namespace database, or a
    database an operator granted (tenants.py); the workers resolve it the same way
    (cairn_ingest_worker.tenancy). A collection dropped after this check fails the job in the
    worker instead. `at`: where the job is in the request body; `must_exist` False checks the
    grant only (a chain step may read what an earlier step writes)."""
    name = spec.params.get("collection")
    if spec.pipeline != MONGO_RANGE or not isinstance(name, str):
        return
    database = spec.params.get("database")
    sources = await tenants.source_database(tenant, database if isinstance(database, str) else None, name, at)
    if not must_exist:
        return
    # The membership test keeps the answer right where a server ignores the filter (nx-27017).
    if name in await sources.list_collection_names(filter={"name": name}):
        return
    raise SourceNotFound(name, sources.name, at)


def job_size(spec: JobSpec, space: dict[str, Any] | None, at: tuple[str | int, ...] = ("body",)) -> JobSize:
    """What a job asks of its tenant's per-job quotas (`cairn_contracts.tenancy.job_demand`: from
    its spec and its resolved work space, None for a `params_from` job, whose filled params the
    scheduler checks at release), the job being at `at` in the request body (a chain's step at
    `("body", "steps", i)`)."""
    return JobSize(job_demand(spec, space), at)


def view_state(job: dict[str, Any]) -> JobState:
    """The state reported for a stored job: CANCELLING (never stored) while a cancel is pending."""
    state = JobState(job["state"])
    if job.get("cancel_requested") and not state.is_terminal:
        return JobState.CANCELLING
    return state


def progress(state: JobState, checkpoints: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """(percent done 0-100 rounded to 0.01, records done) of a job from its shards' checkpoints.

    Each shard counts for its share of its work space, weighted by its expected records: hash-mod
    shards each scan the whole range, range shards their own part of it. How far a shard is comes
    from its checkpoint's `position` (what the pipeline reports, in space units; a shard without
    one counts as not started until it is `done`; checkpoints from before opaque cursors have an
    integer `cursor` instead). A SUCCESS job is 100."""
    done_weight = total_weight = 0.0
    records_done = 0
    for checkpoint in checkpoints:
        span = max(1, int(checkpoint["range_end"]) - int(checkpoint["range_start"]))
        weight = float(checkpoint.get("records_estimate", span))
        start = int(checkpoint["range_start"])
        position = int(checkpoint["range_end"]) if checkpoint.get("done") else checkpoint.get("position", checkpoint.get("cursor"))
        if isinstance(position, int) and not isinstance(position, bool):
            done_weight += weight * min(span, max(0, position - start)) / span
        total_weight += weight
        records_done += int(checkpoint.get("records_done", 0))
    if state == JobState.SUCCESS:
        return 100.0, records_done
    return (round(100.0 * done_weight / total_weight, 2) if total_weight else 0.0), records_done


def job_progress(job: dict[str, Any], state: JobState) -> tuple[float, int]:
    """(percent 0-100, records done) from the job document alone (O(1) in its shards).

    The larger of two figures that only grow: the counted shards' share (`counts.weight_done`
    of `weight_total`, exact as shards end: cairn_runtime.tally) and the scheduler's last
    snapshot of every checkpoint (`progress`, refreshed by its periodic roll-up, which also sees
    running shards). A SUCCESS job is 100; a job finished before the counters existed reports
    its result."""
    counts = tally.counts_of(job)
    snapshot = tally.as_dict(job.get("progress"))
    result = tally.as_dict(job.get("result"))
    records_done = max(counts["records_done"], int(snapshot.get("records_done") or 0), int(result.get("records_done") or 0))
    if state == JobState.SUCCESS:
        return 100.0, records_done
    weight_total = int(job.get("weight_total") or 0)
    counted = 100.0 * counts["weight_done"] / weight_total if weight_total else 0.0
    return round(min(100.0, max(counted, float(snapshot.get("percent") or 0.0))), 2), records_done


def shard_counts(job: dict[str, Any]) -> ShardCounts:
    """The job's shards by state from the job document: the ended ones from its counters (exact),
    the others from the scheduler's last snapshot (`shard_states`), capped to what is left."""
    total = int(job.get("shard_count") or 0)
    snapshot = tally.as_dict(job.get("shard_states"))
    if tally.COUNTS not in job:  # a job the counters never saw (finished before them): its snapshot
        return ShardCounts(total=total, **{str(k).lower(): int(v) for k, v in snapshot.items() if str(k) in ShardState.__members__})
    counts = tally.counts_of(job)
    ended = {str(state).lower(): counts[field] for state, field in tally.SHARD_COUNTERS.items()}
    left = max(0, total - sum(ended.values()))
    active: dict[str, int] = {}
    for state in _ACTIVE_SHARD_STATES:
        active[state.lower()] = min(left, int(snapshot.get(state) or 0))
        left -= active[state.lower()]
    active["queued"] += left  # reopened since the snapshot: waiting again
    return ShardCounts(total=total, **ended, **active)


def result_expiry_ms(job: dict[str, Any], ttl_s: int) -> int | None:
    """When a finished job's result expires, in epoch ms (None: its finish time is unknown)."""
    finished_ms = job.get("finished_at_ms") if isinstance(job.get("finished_at_ms"), int) else clock.stored_ms(job.get("finished_at"))
    return finished_ms + ttl_s * 1000 if finished_ms is not None else None


def state_query(state: JobState) -> dict[str, Any]:
    if state == JobState.CANCELLING:
        return {"cancel_requested": True, "state": {"$in": state_values(ACTIVE_JOB_STATES)}}
    if state in ACTIVE_JOB_STATES:
        return {"state": str(state), "cancel_requested": {"$in": [False, None]}}
    return {"state": str(state)}


def encode_cursor(doc: dict[str, Any]) -> str:
    """The opaque page cursor after `doc` (a job or a schedule: its created_at_ms and _id)."""
    raw = json.dumps([int(doc.get("created_at_ms") or 0), doc["_id"]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(created_at_ms, _id) of the last item of the previous page; `InvalidCursor` for anything
    this API cannot have given out (a hand-made one must not reach the store: int64, UTF-8)."""
    try:
        created_ms, doc_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(created_ms, int) or isinstance(created_ms, bool) or not 0 <= created_ms <= INT64_MAX:
            raise ValueError
        if not isinstance(doc_id, str) or len(doc_id) > 200:
            raise ValueError
        check_storable(doc_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidCursor() from None
    return created_ms, doc_id


def after_cursor(query: dict[str, Any], cursor: str | None) -> dict[str, Any]:
    """`query` narrowed to the items after `cursor` in (created_at_ms, _id) descending order."""
    if not cursor:
        return query
    created_ms, doc_id = decode_cursor(cursor)
    return {
        "$and": [query, {"$or": [{"created_at_ms": {"$lt": created_ms}}, {"created_at_ms": created_ms, "_id": {"$lt": doc_id}}]}]
    }


def encode_shard_cursor(index: int) -> str:
    """The opaque cursor of a job's shard page: after shard `index`."""
    return base64.urlsafe_b64encode(json.dumps(["s", index]).encode()).decode().rstrip("=")


def decode_shard_cursor(cursor: str) -> int:
    """The shard index a page cursor names; `InvalidCursor` for anything this API did not give out."""
    try:
        tag, index = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if tag != "s" or not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= INT64_MAX:
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidCursor(("query", "shards_after")) from None
    return index


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
        query: dict[str, Any] = tenant_match(tenant)  # an operator's ("*"): every tenant's
        if self.state is not None:
            query.update(state_query(self.state))
        for field in ("pipeline", "priority", "schedule_id"):
            if (value := getattr(self, field)) is not None:
                query[field] = value
        created: dict[str, int] = {}
        if self.created_after is not None:
            created["$gte"] = clock.stored_ms(self.created_after) or 0
        if self.created_before is not None:
            created["$lt"] = clock.stored_ms(self.created_before) or 0
        if created:
            query["created_at_ms"] = created
        if self.q:
            # Case-insensitive substring of the name; the text is escaped, never a pattern.
            query["name"] = {"$regex": re.escape(self.q), "$options": "i"}
        return query


def summary(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job["_id"],
        "tenant": job.get("tenant"),
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
        "after": job.get("after") or [],
        "chain_id": job.get("chain_id"),
        "chain_step": job.get("chain_step"),
        "released_at": job.get("released_at"),
        "dependency_failure": job.get("dependency_failure"),
        "url": f"/v1/jobs/{job['_id']}",
    }


@dataclass(frozen=True)
class JobService:
    """Jobs of a tenant. `cache_ttl_s`: how long a finished job's status stays in Redis (0: off);
    `result_ttl_s`: how long a finished job's result is kept (then `ResultExpired`)."""

    db: AsyncDatabase
    publisher: Publisher
    cache: aioredis.Redis
    cache_prefix: str
    cache_ttl_s: int
    result_ttl_s: int
    tenants: TenantService  # quotas, and where a tenant's mongo_range sources are
    locks: JobLocks | None = None  # the Redis lock per job fingerprint (None: no lock)

    async def submit(
        self, spec: JobSpec, tenant: str, idempotency_key: str | None, *, schedule_id: str | None = None
    ) -> Submission:
        """Record the job, then publish its command with a confirm.

        Accepted means recorded: if the broker does not confirm, the job stays PENDING with no
        `command_published_at`, and the scheduler's relay publishes it once the broker is back.

        Duplicates, two layers (joblock.py): the same tenant and Idempotency-Key give the same job
        (the unique index; its id derives from the key, so concurrent identical requests race for
        one document; another spec under the key raises `IdempotencyConflict`), and a job
        identical to an unfinished one is refused (`DuplicateJob`, the Redis lock per spec
        fingerprint). Raises `Invalid` for a job the pipeline catalog refuses (catalog.py) or
        naming a source database not granted to the tenant, `SourceNotFound` for a mongo_range job
        without its source, and `QuotaInvalid` (422) / `QuotaExceeded` (429) over one of the
        tenant's quotas (tenants.py; checked after the Idempotency-Key lookup: a retry of an
        accepted request gets its job, not a 429).

        A job naming `after` is recorded WAITING (its ids must be jobs of the tenant:
        `UnknownDependency` at ["body", "after", i]); its StartJob asks the scheduler to look at
        its dependencies, which releases it (PENDING, planned) once they succeeded.
        """
        if spec.params_from and not spec.after:
            raise NoDependency(("body", "params_from"))
        await check_dependencies(self.db, tenant, spec.after, ("body", "after"))
        checked = await check_spec(self.db, spec)
        record = JobRecord.new(
            spec,
            tenant,
            idempotency_key=idempotency_key,
            schedule_id=schedule_id,
            pipeline_version=checked.version,
            space=checked.space,
        )
        describe_work(job_id=record.id, tenant=tenant, pipeline=spec.pipeline)  # span + log context
        if idempotency_key is not None:
            existing = await self.db[JOBS].find_one({"tenant": tenant, "idempotency_key": idempotency_key})
            if existing is not None:
                return self._same_job(existing, record)
        await self.tenants.check_submit(tenant, job_size(spec, checked.space))  # 429/422 naming the quota
        await check_source(self.tenants, tenant, spec)
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
        logger.info("job %s recorded %s (tenant %s, pipeline %s, %s)", record.id, record.state, tenant, spec.pipeline, spec.sharding.strategy)
        await self.publish_start(record.id, tenant, spec)
        return Submission(record.id, record.state, created=True)

    @staticmethod
    def _same_job(existing: dict[str, Any], record: JobRecord) -> Submission:
        if existing.get("spec_fingerprint") != record.spec_fingerprint:
            raise IdempotencyConflict(
                f"Idempotency-Key {record.idempotency_key!r} was used for a different job ({existing['_id']})"
            )
        return Submission(existing["_id"], JobState(existing["state"]), created=False)

    async def publish_start(self, job_id: str, tenant: str, spec: JobSpec) -> None:
        """Publish the job's StartJob with a confirm, then mark it published; an unconfirmed
        command is left to the scheduler's relay (PENDING jobs) or dependency sweep (WAITING)."""
        command = StartJob(job_id=job_id, tenant=tenant, spec=spec)
        try:
            await self.publisher.publish(command, priority=int(spec.priority), correlation_id=job_id)
        except PublishNotConfirmed:
            logger.warning("job %s recorded; its command was not confirmed and will be relayed", job_id, exc_info=True)
            return
        # Not over a release: the scheduler may have released a WAITING job since (its own StartJob
        # still to publish, `command_published_at` reset for the relay); marking it would hide that
        # command from the relay should the scheduler die before publishing it.
        await self.db[JOBS].update_one({"_id": job_id, "released_at_ms": {"$in": [None]}}, {"$set": {"command_published_at": clock.utcnow()}})
        logger.info("job %s: StartJob published to the scheduler (confirmed)", job_id)

    async def status(self, tenant: str, job_id: str) -> TaskStatus:
        """The job's status (`/task/status`): a finished job's from the Redis cache, else (or with
        Redis away) from MongoDB. Raises `JobNotFound`."""
        if tenant == ALL_TENANTS:
            # An operator reads through the job's own tenant's cache entry: the one whoever
            # reopens a finished job (a DLQ replay) drops.
            tenant = (await self._job(tenant, job_id, {"tenant": 1})).get("tenant") or DEFAULT_TENANT
        cache_key = STATUS_CACHE_KEY.format(prefix=self.cache_prefix, tenant=tenant, job_id=job_id)
        cached = await self._cached(cache_key)
        if cached is not None:
            return TaskStatus.model_validate_json(cached)
        job = await self._job(tenant, job_id, _STATUS)
        state = view_state(job)
        percent, records_done = job_progress(job, state)
        shards = shard_counts(job)
        status = TaskStatus(
            task_id=job_id,
            state=state,
            progress=percent,
            records_done=records_done,
            writes=Writes.of_job(job),
            records_total=job.get("records_total"),
            shards=shards,
            pipeline=job["pipeline"],
            name=job.get("name"),
            priority=job["priority"],
            created_at=job["created_at"],
            started_at=job.get("started_at"),
            finished_at=job.get("finished_at"),
            # Read only when the counters say there is something to list (bounded: DETAIL_LIMIT).
            # (a job in RETRY has a shard waiting even before the snapshot counts it)
            retrying=await retrying_shards(self.db, job_id) if shards.retry or state == JobState.RETRY else [],
            failed_shards=await failed_shards(self.db, job_id) if shards.failed else [],
            dead_letters_url=f"/dlq/entries?job_id={job_id}" if shards.failed else None,
        )
        if state.is_terminal and self.cache_ttl_s:
            # Only finished jobs are cached: their status can no longer change.
            try:
                await self.cache.set(cache_key, status.model_dump_json(), ex=self.cache_ttl_s)
            except REDIS_UNAVAILABLE as error:
                fell_back("redis", "status_cache", error, "job status is read from MongoDB")
        return status

    async def _cached(self, cache_key: str) -> bytes | str | None:
        """The cached status, or None if absent or Redis does not answer (MongoDB has the truth)."""
        try:
            return await self.cache.get(cache_key)
        except REDIS_UNAVAILABLE as error:
            fell_back("redis", "status_cache", error, "job status is read from MongoDB")
            return None

    async def list(self, tenant: str, job_filter: JobFilter, limit: int, cursor: str | None) -> JobPage:
        """A page of the tenant's jobs, newest first. Raises `InvalidCursor`."""
        query = after_cursor(job_filter.query(tenant), cursor)
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
        async for row in await self.db[JOBS].aggregate([{"$match": tenant_match(tenant)}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]):
            stored[str(row["_id"])] += int(row["n"])
        cancelling: Counter[str] = Counter()
        async for job in self.db[JOBS].find(state_query(JobState.CANCELLING) | tenant_match(tenant), {"state": 1}):
            cancelling[job["state"]] += 1
        counts = {str(s): stored.get(str(s), 0) - cancelling.get(str(s), 0) for s in JobState}
        counts[JobState.CANCELLING] = sum(cancelling.values())
        return JobCounts(counts=counts, total=sum(stored.values()))

    async def get(self, tenant: str, job_id: str, shard_limit: int, shards_after: str | None = None) -> JobDetail:
        """The job with its spec, progress and one page of its shards: up to `shard_limit` in
        index order after the opaque `shards_after` (the previous page's `shards_next_cursor`).
        The summary is the job document's (O(1) in the shards); the page reads its own shards
        and their checkpoints (by `_id`). Raises `JobNotFound`, `InvalidCursor`."""
        job = await self._job(tenant, job_id, {tally.LEDGER: 0})
        after = decode_shard_cursor(shards_after) if shards_after else -1
        shards = [
            s async for s in self.db[SHARDS].find({"job_id": job_id, "index": {"$gt": after}}).sort("index", 1).limit(shard_limit + 1)
        ]
        more = len(shards) > shard_limit
        shards = shards[:shard_limit]
        ids = [tally.checkpoint_id(s["shard_key"]) for s in shards]
        checkpoints = {c["shard_key"]: c async for c in self.db[CHECKPOINTS].find({"_id": {"$in": ids}})} if ids else {}
        views = []
        for shard in shards:
            checkpoint = checkpoints.get(shard["shard_key"], {})
            views.append(
                ShardView(
                    shard_key=shard["shard_key"],
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
        percent, records_done = job_progress(job, JobState(job["state"]))
        writes = Writes.of_job(job)
        if after < 0 and not more and checkpoints:
            # This page is every shard: its checkpoints are fresher than the last snapshot.
            page_percent, page_records = progress(JobState(job["state"]), checkpoints.values())
            percent, records_done = max(percent, page_percent), max(records_done, page_records)
            writes = Writes.of(checkpoints.values(), job)
        return JobDetail.model_validate(
            {
                **summary(job),
                "spec": job["spec"],
                "progress": percent,
                "records_done": records_done,
                "writes": writes,
                "shards": views,
                "shards_truncated": more,
                "shards_next_cursor": encode_shard_cursor(int(shards[-1].get("index") or 0)) if more and shards else None,
            }
        )

    async def cancel(self, tenant: str, job_id: str, requested_by: str) -> JobSummary:
        """Mark the job, then ask the scheduler to stop it. Accepted either way once it is marked:
        a command the broker did not confirm is made up for by the scheduler's cancel sweep.

        Raises `JobNotFound`, and `JobFinished` when the job has finished (SUCCESS, FAILURE or
        already CANCELLED): nothing can change, and the client is told so rather than given a 202
        that means nothing. A job still CANCELLING is asked again: its stop is not finished."""
        describe_work(job_id=job_id, tenant=tenant)  # span + log context: `grep <job id>` finds the cancel
        now = clock.utcnow()
        job = await self.db[JOBS].find_one_and_update(
            {"_id": job_id, "tenant": tenant, "state": {"$in": state_values(ACTIVE_JOB_STATES)}},
            {
                "$set": {
                    "cancel_requested": True,
                    "cancel_requested_at": now,
                    "cancel_requested_at_ms": clock.to_ms(now),
                    "cancel_requested_by": requested_by,
                }
            },
            projection=_SUMMARY,
            return_document=ReturnDocument.AFTER,
        )
        if job is None:
            job = await self._job(tenant, job_id, _SUMMARY)
            if job["state"] == JobState.CANCELLED:
                raise JobFinished(job_id, f"job {job_id} is already CANCELLED")
            raise JobFinished(job_id, f"job {job_id} is {job['state']}: a finished job cannot be cancelled")
        try:
            await self.publisher.publish(CancelJob(job_id=job_id, tenant=tenant, requested_by=requested_by), correlation_id=job_id)
        except PublishNotConfirmed:
            logger.warning("cancel of job %s recorded; the command was not confirmed (the sweep will do it)", job_id, exc_info=True)
        logger.info("cancel of job %s requested by %s", job_id, requested_by)
        return JobSummary.model_validate(summary(job))

    async def delete(self, tenant: str, job_id: str) -> None:
        """A finished job, its shards and its checkpoints; the records it stored stay. Raises
        `JobNotFound`, and `JobFinished` (a conflict) for a job not finished yet."""
        job = await self._job(tenant, job_id, {"state": 1, "tenant": 1, "spec_fingerprint": 1})
        if job["state"] not in TERMINAL_JOB_STATES:
            raise JobFinished(job_id, f"job {job_id} is {job['state']}: only a finished job can be deleted (cancel it first)")
        # The job document goes last: until then a failed delete can simply be repeated.
        await self.db[SHARDS].delete_many({"job_id": job_id})
        await self.db[CHECKPOINTS].delete_many({"job_id": job_id})
        await self.db[JOB_TALLIES].delete_many({"job_id": job_id})
        await self.db[JOBS].delete_one({"_id": job_id, "tenant": tenant, "state": {"$in": state_values(TERMINAL_JOB_STATES)}})
        try:
            await self.cache.delete(STATUS_CACHE_KEY.format(prefix=self.cache_prefix, tenant=tenant, job_id=job_id))
        except Exception:
            logger.warning("cached status of deleted job %s not dropped", job_id, exc_info=True)
        if self.locks is not None:
            await self.locks.release_job(job)
        logger.info("job %s deleted", job_id)

    async def result(self, tenant: str, job_id: str) -> JobResultBody:
        """The result of a finished job, kept `result_ttl_s` after it finished (for both APIs).

        Raises `JobNotFound`, `JobStillRunning` (not finished), `ResultExpired` (the retention
        sweep dropped it, or it is older than `result_ttl_s`)."""
        job = await self._job(tenant, job_id)
        state = JobState(job["state"])
        if not state.is_terminal:
            raise JobStillRunning(job_id, view_state(job))
        expires_ms = result_expiry_ms(job, self.result_ttl_s)
        if job.get("result_expired") or (expires_ms is not None and expires_ms <= clock.now_ms()):
            raise ResultExpired(job_id, self.result_ttl_s)
        return JobResultBody(
            id=job_id,
            state=state,
            # A concurrent roll-up may have added its stale deletes after the result was written.
            result={**(job.get("result") or {}), **({"records_deleted": job["records_deleted"]} if "records_deleted" in job else {})},
            finished_at=job.get("finished_at"),
            expires_at=clock.from_ms(expires_ms) if expires_ms is not None else None,
        )

    async def _job(self, tenant: str, job_id: str, projection: dict[str, int] | None = None) -> dict[str, Any]:
        job = await self.db[JOBS].find_one({"_id": job_id, **tenant_match(tenant)}, projection)
        if job is None:
            raise JobNotFound(job_id)
        return job
