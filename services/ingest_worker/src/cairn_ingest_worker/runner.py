"""Runs one shard: claim, then read → clean → store → checkpoint, batch by batch, until done.

The pipeline (a cairn_sdk.Pipeline) owns the cursor: the runner asks it where a fresh shard starts
(`start`), reads from the last committed cursor (`read`), keeps what `clean` returns with `_id` =
`identity(record)`, commits the batch's cursor (opaque JSON) with the stored records, and ends the
shard once a batch says `done`.

Plain code over its collaborators (collections, leases); the Celery task around it only decodes
the message and turns outcomes into acks, retries and dead letters.
"""

import hashlib
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from celery.exceptions import SoftTimeLimitExceeded
from opentelemetry import trace
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, ConnectionFailure

from cairn_contracts import clock
from cairn_contracts.messages import RunShard
from cairn_contracts.sinks import window_key
from cairn_contracts.store import DEDUP, DEFAULT_TENANT
from cairn_ingest_worker import metrics
from cairn_ingest_worker.effects import TaskDedupLedger
from cairn_ingest_worker.errors import BatchTimedOut, CursorNotAdvanced, StoreUnavailable, is_store_outage
from cairn_ingest_worker.leases import Claim, Heartbeat, OneBatch, ShardLeases
from cairn_ingest_worker.observability import current_pipeline, note_shard
from cairn_ingest_worker.pipelines import build_pipeline
from cairn_ingest_worker.store import RunStamp, insert_groups, write_records
from cairn_ingest_worker.tenancy import TenantNamespaces
from cairn_runtime.log import log_context
from cairn_runtime.tracing import span_attributes
from cairn_sdk import Bounds, Bucket, Pipeline, RunContext

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


# What a run reads of its job: written when the job is recorded (`space` before its first shard is
# planned) and never changed after, so a process may keep it for every shard of the job.
JOB_FIELDS = {"spec": 1, "tenant": 1, "created_at_ms": 1, "space": 1}


class JobDocuments:
    """The immutable part of job documents (`JOB_FIELDS`), read once per process and job rather
    than once or twice per shard: a 1,024-shard job's runs read their job once per process.

    Bounded (least recently used out); only found documents are kept (a job not recorded yet is
    read again next time). Thread-safe (the threads pool shares one runner). A job deleted and
    submitted again keeps its id: a caller that knows which submission it runs (its shard's
    `job_created_at_ms`) gets that one, read again when the cached one is an earlier one."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._docs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, jobs: Collection, job_id: str, submission: int | None = None) -> dict[str, Any] | None:
        """The job's `JOB_FIELDS` (None: no such job). `submission`: the `created_at_ms` the
        caller's shard was planned for (None: any)."""
        with self._lock:
            job = self._docs.get(job_id)
            if job is not None and (submission is None or int(job.get("created_at_ms") or 0) == submission):
                self._docs.move_to_end(job_id)
                return job
        job = jobs.find_one({"_id": job_id}, JOB_FIELDS)
        if job is not None:
            with self._lock:
                self._docs[job_id] = job
                while len(self._docs) > self._size:
                    self._docs.popitem(last=False)
        return job


@dataclass(frozen=True)
class ShardRunner:
    leases: ShardLeases
    jobs: Collection
    shards: Collection
    records_db: Database
    source_db: Database
    heartbeat_interval_s: float
    slice_s: float  # longest run of one task before it hands off to a continuation
    batch_time_limit_s: float | None = None  # past it, the heartbeat stops renewing the lease
    # What pipelines may reach through their RunContext (cairn_sdk): Redis (None: not configured)
    # and the prefix of its keys, the worker's named secrets (never logged), the hosts each
    # bound one may go to and the tenants it serves, and whether their HTTP may reach private networks.
    redis: Any = None
    redis_prefix: str = "cairn"
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    secret_hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)
    secret_tenants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_private_networks: bool = False
    job_documents: JobDocuments = field(default_factory=JobDocuments, repr=False)

    def job(self, job_id: str, submission: int | None = None) -> dict[str, Any] | None:
        """The job's `JOB_FIELDS` (spec, tenant, created_at_ms, space), from this process's cache;
        `submission`: see `JobDocuments.get` (`job_of` passes a claim's)."""
        return self.job_documents.get(self.jobs, job_id, submission)

    def job_of(self, claim: Claim) -> dict[str, Any] | None:
        """The job document of the submission the claim's shard was planned for."""
        stamp = claim.shard.get("job_created_at_ms")
        return self.job(claim.shard["job_id"], None if stamp is None else int(stamp))

    # Each job's tenant namespace (records, sources, raw pages) and granted sources (tenancy.py).
    # None: `records_db` and `source_db` for every job (single-namespace unit tests only: the
    # production wiring, context.py, always sets it).
    namespaces: TenantNamespaces | None = None

    def databases(self, tenant: str | None) -> tuple[Database, Database]:
        """(records database, source database) of a job of `tenant`."""
        if self.namespaces is None:
            return self.records_db, self.source_db
        namespace = self.namespaces.records_db(tenant)
        return namespace, namespace


@dataclass(frozen=True)
class Outcome:
    kind: Literal["succeeded", "not_claimable", "lease_lost", "poison", "sliced", "cancelled"]
    claim: Claim | None = None
    records: int = 0


class ShardFailed(Exception):
    """The pipeline raised while this worker held the shard."""

    def __init__(self, claim: Claim, pipeline: str, error: BaseException) -> None:
        super().__init__(f"shard {claim.shard_key}: {type(error).__name__}: {error}")
        self.claim = claim
        self.pipeline = pipeline
        self.error = error


def run_shard(runner: ShardRunner, request: RunShard, *, max_attempts: int, deadline: float | None = None) -> Outcome:
    """Claim the request's shard and run it (see `run_claimed`) until `deadline` (time.monotonic();
    default: one slice from now; a bundle passes its own).

    Raises `ShardFailed` (the pipeline failed, or a batch ran past the soft time limit:
    `BatchTimedOut`) and `StoreUnavailable` (MongoDB unreachable; its `claim` is set if the
    shard was already taken)."""
    try:
        claim = runner.leases.claim(request.shard_key)
    except ConnectionFailure as error:  # a claim that timed out is retried like an outage
        raise StoreUnavailable(error) from error
    if claim is None:
        return Outcome("not_claimable")
    return run_claimed(runner, claim, max_attempts=max_attempts, deadline=deadline if deadline is not None else time.monotonic() + runner.slice_s)


def run_claimed(runner: ShardRunner, claim: Claim, *, max_attempts: int, deadline: float) -> Outcome:
    """Run a claimed shard from its checkpoint until it is done, the lease is lost, or the
    deadline passes (then the lease is handed off at a batch boundary: outcome `sliced`).
    Its log lines name the job and shard, and only its own (a frontier runner runs several).

    A store outage anywhere in the run raises `StoreUnavailable(claim=claim)` (no attempt spent:
    the caller hands the lease back), and so does a timeout of Cairn's own bookkeeping writes
    (a `NetworkTimeout` inside a batch's read or store is the shard's retryable failure instead);
    Celery's soft time limit, wherever it lands, raises
    `ShardFailed` with a retryable `BatchTimedOut`: the batch in flight is not committed."""
    with log_context(job_id=claim.shard["job_id"], shard_key=claim.shard_key):
        try:
            return _run_claimed(runner, claim, max_attempts=max_attempts, deadline=deadline)
        except (ShardFailed, StoreUnavailable):
            raise
        except SoftTimeLimitExceeded as error:
            raise ShardFailed(claim, current_pipeline(), _timed_out(claim)) from error
        except ConnectionFailure as error:  # Cairn's own bookkeeping (lease, checkpoint, job) failed
            raise StoreUnavailable(error, claim) from error


def _timed_out(claim: Claim) -> BatchTimedOut:
    return BatchTimedOut(f"shard {claim.shard_key}: a batch ran past the task's soft time limit; it was not committed")


def _run_claimed(runner: ShardRunner, claim: Claim, *, max_attempts: int, deadline: float) -> Outcome:
    if not claim.adopted:  # a bundle's first claim: its commits below are fenced on its checkpoint
        adopted, _ = runner.leases.adopt_all([claim])
        if not adopted:
            return Outcome("lease_lost", claim)
        claim = adopted[0]
    if claim.attempt > max_attempts:
        # Earlier attempts died without recording a failure: the shard kills its workers.
        return Outcome("poison", claim)
    job_id = claim.shard["job_id"]
    job = runner.job_of(claim)
    if job is None:
        raise ShardFailed(claim, "unknown", LookupError(f"job {job_id} is not recorded"))
    spec: dict[str, Any] = job["spec"]
    pipeline_name = spec["pipeline"]
    note_shard(job_id=job_id, shard_key=claim.shard_key, pipeline=pipeline_name, tenant=job.get("tenant"), attempt=claim.attempt)
    bounds = shard_bounds(claim.shard, job.get("space"), spec.get("params") or {})
    try:
        pipeline = build_pipeline(pipeline_name, spec.get("params") or {}, _context(runner, claim, job))
    except Exception as error:
        raise ShardFailed(claim, pipeline_name, error) from error
    try:
        return _run_batches(runner, claim, job, pipeline, bounds, deadline=deadline)
    finally:
        _close(pipeline, claim)


def _close(pipeline: Pipeline[Any], claim: Claim) -> None:
    """Free what the run's pipeline holds (clients, files): whatever the run's outcome, and a
    failure to close is logged only (the shard's outcome is already decided)."""
    try:
        pipeline.close()
    except Exception:
        logger.exception("shard %s: the pipeline failed to close", claim.shard_key)


def _run_batches(runner: ShardRunner, claim: Claim, job: dict[str, Any], pipeline: Pipeline[Any], bounds: Bounds, *, deadline: float) -> Outcome:
    job_id = claim.shard["job_id"]
    spec: dict[str, Any] = job["spec"]
    pipeline_name = spec["pipeline"]
    try:
        # A fresh shard starts where the pipeline says; a resumed one at its last committed cursor.
        cursor = pipeline.start(bounds) if claim.fresh and not claim.done else claim.cursor
    except Exception as error:
        raise ShardFailed(claim, pipeline_name, error) from error
    target = runner.databases(job.get("tenant"))[0][spec["target_collection"]]  # the tenant's namespace
    write_mode = spec.get("write_mode", "insert")
    run = RunStamp(
        job_id, int(job.get("created_at_ms") or 0), window_key(spec) if write_mode == "replace_window" else None
    )
    if not claim.fresh:
        logger.info("shard %s: resuming at cursor %s (token %d)", claim.shard_key, _shown(cursor), claim.token)
    records = 0
    committed = 0  # batches this run committed
    totals: dict[str, int] | None = None  # the checkpoint's counters after this run's last commit
    done = claim.done  # committed as done by a run that died before marking the shard SUCCEEDED
    # Digests of the cursors this run read from: a batch handing back one of them (its own, or
    # an earlier one: an API whose next pages point back at each other) would loop forever.
    visited = {_cursor_key(cursor)}
    with Heartbeat(runner.leases, claim, runner.heartbeat_interval_s, runner.batch_time_limit_s) as heartbeat:
        while not done:
            if heartbeat.lost.is_set():
                return _stopped(runner, claim, heartbeat, records)
            if time.monotonic() >= deadline:
                if runner.leases.hand_off(claim):
                    return Outcome("sliced", claim, records)
                return Outcome("lease_lost", claim, records)
            started = time.perf_counter()
            with tracer.start_as_current_span(
                "cairn.batch",
                attributes=span_attributes(job_id=job_id, shard_key=claim.shard_key, cursor=_attribute(cursor), pipeline=pipeline_name),
            ):
                heartbeat.batch_started()
                try:
                    batch = pipeline.read(bounds, cursor, int(spec["batch_size"]))
                    if not batch.done and _cursor_key(batch.cursor) in visited:
                        raise CursorNotAdvanced(
                            f"{pipeline_name}.read at cursor {_shown(cursor)} returned {_shown(batch.cursor)}, "
                            "a cursor this run already read from, without done"
                        )
                    if heartbeat.lost.is_set():
                        # Cancelled, taken over or past its time bound while reading: this batch
                        # is neither stored nor committed (the checkpoint stays where it is).
                        return _stopped(runner, claim, heartbeat, records)
                    cleaned = identified(pipeline, batch.records)
                    # The batch's index (committed batches before it) marks its records, so a redo
                    # of it after a lost commit is recognised and counted once (store.py).
                    this_batch = replace(run, batch=f"{claim.shard_key}#{claim.batches + committed}")
                    stored = write_records(target, cleaned, mode=write_mode, run=this_batch)
                except SoftTimeLimitExceeded as error:
                    raise ShardFailed(claim, pipeline_name, _timed_out(claim)) from error
                except Exception as error:
                    if is_store_outage(error):
                        raise StoreUnavailable(error, claim) from error
                    raise ShardFailed(claim, pipeline_name, error) from error
                heartbeat.batch_finished()
                # A finished shard is at its end whatever the pipeline reported as its position.
                position = bounds.end if batch.done else batch.position
                commit = runner.leases.commit(claim, batch.cursor, len(batch.records), stored, position=position, done=batch.done)
                if not commit.stored:
                    runner.leases.note_fenced_write(claim)
                    logger.warning("shard %s: checkpoint refused, token %d is stale", claim.shard_key, claim.token)
                    return Outcome("lease_lost", claim, records)
            cursor, done, totals = batch.cursor, batch.done, commit.totals
            visited.add(_cursor_key(cursor))
            committed += 1
            records += len(batch.records)
            metrics.RECORDS.labels(pipeline_name).inc(len(batch.records))
            metrics.RECORDS_REDONE.labels(pipeline_name).inc(stored.duplicate)
            metrics.observe_write(pipeline_name, stored)
            metrics.BATCHES.labels(pipeline_name).inc()
            metrics.BATCH_SECONDS.labels(pipeline_name).observe(time.perf_counter() - started)
            if commit.cancel_requested and not done:
                # The job was cancelled: stop at this batch boundary, the batch committed, the
                # checkpoint where it is (cooperative: nothing is killed, nothing half-written).
                if runner.leases.cancel(claim):
                    logger.info("shard %s: cancelled at cursor %s after %d records", claim.shard_key, _shown(cursor), records)
                    return Outcome("cancelled", claim, records)
                runner.leases.note_fenced_write(claim)
                return Outcome("lease_lost", claim, records)
    if not runner.leases.succeed(claim, totals):
        runner.leases.note_fenced_write(claim)
        return Outcome("lease_lost", claim, records)
    return Outcome("succeeded", claim, records)


@dataclass(frozen=True)
class BundleRun:
    """What `run_in_one_batch` did with a bundle's claims: the shards it ended (`outcomes`:
    succeeded, or lease_lost when another worker holds the shard now), the ones whose pipeline
    failed (`failures`: nothing of theirs stored or committed) and the claims it left for
    `run_claimed` (`rest`)."""

    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[ShardFailed] = field(default_factory=list)
    rest: list[Claim] = field(default_factory=list)
    # Claims that could not start: another worker holds the shard now, or its job was cancelled.
    unstarted: list[Claim] = field(default_factory=list)


def run_in_one_batch(
    runner: ShardRunner, claims: list[Claim], *, max_attempts: int, deadline: float | None = None, lap: Callable[[], None] | None = None
) -> BundleRun:
    """A bundle's shards that are each read whole by one batch, run together (issue 14): each is
    read and cleaned by its own pipeline (its own RunContext, bounds and attempt), then all their
    records are stored by one `insert_many` (`insert_groups`) and every shard is committed and
    marked SUCCEEDED by two bulk writes (`ShardLeases.finish_all`): three round trips for the lot
    where one by one takes three per shard. Each shard keeps its own checkpoint, fencing token,
    totals and outcome.

    Taken here: fresh, not yet started claims (`ShardLeases.claim_waiting`) of an `insert` job,
    when the job allows more than one attempt (the attempts of all of them are counted together
    before any is read: a crash charges each one, which only a one-attempt job could not afford),
    whose first batch says `done`. Left in `rest` for `run_claimed` (not started): every other
    claim, and, past `deadline` (time.monotonic()), the claims not read yet. Started here and then
    left in `rest`: a shard whose first batch is not its last (that read is redone there). A
    shard whose records the store refused with anything but a duplicate key fails as it would
    alone (`failures`); Celery's soft time limit during the merged writes fails every shard read
    (BatchTimedOut, retryable). Raises StoreUnavailable (claim None) when MongoDB is
    unreachable: the caller hands back every claim not ended. `lap`: called as each shard's read
    and the merged write begin (`HeldLeases.lap`: the batch time limit applies to each)."""
    if not claims:
        return BundleRun()
    lap = lap or (lambda: None)
    job_id = claims[0].shard["job_id"]
    job = runner.job_of(claims[0])
    spec: dict[str, Any] = (job or {}).get("spec") or {}
    if job is None or spec.get("write_mode", "insert") != "insert" or max_attempts < 2:
        return BundleRun(rest=list(claims))
    pipeline_name = spec["pipeline"]
    started = time.perf_counter()
    done = BundleRun()
    eligible = [claim for claim in claims if claim.fresh and not claim.done and claim.attempt + 1 <= max_attempts]
    done.rest.extend(claim for claim in claims if claim not in eligible)
    try:
        begun = runner.leases.start_all(eligible)
    except ConnectionFailure as error:
        raise StoreUnavailable(error) from error
    keys = {claim.shard_key for claim in begun}
    done.unstarted.extend(claim for claim in eligible if claim.shard_key not in keys)
    read: list[tuple[Claim, Any, int, list[dict[str, Any]], int]] = []  # claim, cursor, position, cleaned, records read
    with tracer.start_as_current_span("cairn.bundle", attributes=span_attributes(job_id=job_id, pipeline=pipeline_name)):
        for claim in begun:
            if deadline is not None and read and time.monotonic() >= deadline:
                done.rest.append(claim)  # started: `run_claimed` runs it as a resumed run would
                continue
            with log_context(job_id=job_id, shard_key=claim.shard_key):
                note_shard(job_id=job_id, shard_key=claim.shard_key, pipeline=pipeline_name, tenant=job.get("tenant"), attempt=claim.attempt)
                lap()
                batch = _read_whole(runner, claim, job, done)
            if batch is not None:
                read.append(batch)
        if not read:
            return done
        if _cancel_requested(runner, job_id):
            # Cancelled while they were read: none is stored; each stops here, CANCELLED.
            for claim, *_ in read:
                done.outcomes.append(Outcome("cancelled" if runner.leases.cancel(claim) else "lease_lost", claim))
            return done
        target = runner.databases(job.get("tenant"))[0][spec["target_collection"]]
        lap()
        try:
            results = insert_groups(target, [cleaned for _, _, _, cleaned, _ in read], run=RunStamp(job_id, int(job.get("created_at_ms") or 0)))
            batches = []
            for (claim, cursor, position, _, records), result in zip(read, results, strict=True):
                if isinstance(result, BulkWriteError):
                    done.failures.append(ShardFailed(claim, pipeline_name, result))
                else:
                    batches.append(OneBatch(claim, cursor, position, records, result))
            finished, cancelled = runner.leases.finish_all(batches)
        except SoftTimeLimitExceeded:
            # Interrupted (the task's soft time limit, an operator's terminate): what was read is
            # retried as a timed-out batch is; a commit that landed is found by the next run.
            failed = {failure.claim.shard_key for failure in done.failures}
            done.failures.extend(ShardFailed(claim, pipeline_name, _timed_out(claim)) for claim, *_ in read if claim.shard_key not in failed)
            return done
        except Exception as error:
            if is_store_outage(error):
                raise StoreUnavailable(error) from error
            raise
    if not batches:
        return done
    seconds = (time.perf_counter() - started) / len(batches)  # each shard's share of the bundle's time
    for one in batches:
        metrics.RECORDS.labels(pipeline_name).inc(one.records)
        metrics.RECORDS_REDONE.labels(pipeline_name).inc(one.counts.duplicate)
        metrics.observe_write(pipeline_name, one.counts)
        metrics.BATCHES.labels(pipeline_name).inc()
        metrics.BATCH_SECONDS.labels(pipeline_name).observe(seconds)
        if one.claim.shard_key in finished:
            done.outcomes.append(Outcome("succeeded", one.claim, one.records))
        elif one.claim.shard_key in cancelled and runner.leases.cancel(one.claim):
            # Its records are stored (the batch in flight when the cancel came), not committed.
            done.outcomes.append(Outcome("cancelled", one.claim, one.records))
        else:
            runner.leases.note_fenced_write(one.claim)
            logger.warning("shard %s: checkpoint refused, token %d is stale", one.claim.shard_key, one.claim.token)
            done.outcomes.append(Outcome("lease_lost", one.claim, one.records))
    return done


def _cancel_requested(runner: ShardRunner, job_id: str) -> bool:
    """Whether the job was cancelled (read from the job itself, not this process's cache of it)."""
    try:
        job = runner.jobs.find_one({"_id": job_id}, {"cancel_requested": 1})
    except ConnectionFailure as error:
        raise StoreUnavailable(error) from error
    return bool(job and job.get("cancel_requested"))  # truthiness: the stand-in reads a $set boolean back as 1


def _read_whole(
    runner: ShardRunner, claim: Claim, job: dict[str, Any], done: BundleRun
) -> tuple[Claim, Any, int, list[dict[str, Any]], int] | None:
    """Read and clean a fresh shard's first batch: (claim, cursor, position, cleaned records,
    records read) when it is the shard's whole run; else None, with the claim added to
    `done.failures` (the pipeline raised) or `done.rest` (more batches to come)."""
    spec: dict[str, Any] = job["spec"]
    pipeline_name, params = spec["pipeline"], spec.get("params") or {}
    bounds = shard_bounds(claim.shard, job.get("space"), params)
    # Its run has begun (its attempt counted): a shard read here that is not done in one batch
    # goes on in `run_claimed`, which must not count it again.
    try:
        pipeline = build_pipeline(pipeline_name, params, _context(runner, claim, job))
    except Exception as error:
        done.failures.append(ShardFailed(claim, pipeline_name, error))
        return None
    try:
        batch = pipeline.read(bounds, pipeline.start(bounds), int(spec["batch_size"]))
        if not batch.done:
            done.rest.append(claim)
            return None
        cleaned = identified(pipeline, batch.records)
    except SoftTimeLimitExceeded:
        done.failures.append(ShardFailed(claim, pipeline_name, _timed_out(claim)))
        return None
    except Exception as error:
        if is_store_outage(error):
            raise StoreUnavailable(error) from error
        done.failures.append(ShardFailed(claim, pipeline_name, error))
        return None
    finally:
        _close(pipeline, claim)
    return claim, batch.cursor, bounds.end, cleaned, len(batch.records)


def shard_bounds(shard: dict[str, Any], space: dict[str, Any] | None, params: dict[str, Any]) -> Bounds:
    """The shard's Bounds: its [range_start, range_end), its hash-mod bucket, and for a WorkItems
    space (the job's `space`, from the catalog) its slice of the list param."""
    start, end = int(shard["range_start"]), int(shard["range_end"])
    bucket = shard.get("bucket")
    items = None
    if space and space.get("kind") == "work_items" and isinstance(params.get(space.get("field", "")), list):
        items = tuple(params[space["field"]][start:end])
    return Bounds(start, end, Bucket(int(bucket["modulus"]), int(bucket["remainder"])) if bucket else None, items)


def _context(runner: ShardRunner, claim: Claim, job: dict[str, Any]) -> RunContext:
    tenant = job.get("tenant") or DEFAULT_TENANT
    records_db, source_db = runner.databases(tenant)
    namespaces = runner.namespaces
    return RunContext(
        attempt=claim.attempt,
        job_id=job["_id"],
        shard_key=claim.shard_key,
        tenant=tenant,
        source_db=source_db,
        redis=runner.redis,
        redis_prefix=runner.redis_prefix,
        store_db=records_db,
        secrets=runner.secrets,
        secret_hosts=runner.secret_hosts,
        secret_tenants=runner.secret_tenants,
        allow_private_networks=runner.allow_private_networks,
        granted=(lambda database, collection: namespaces.granted(tenant, database, collection)) if namespaces else None,
        # The TaskDedup ledger of this run (cairn_sdk.effects): owned by this claim's token.
        effects=TaskDedupLedger(
            runner.jobs.database[DEDUP],
            tenant=job.get("tenant") or DEFAULT_TENANT,
            job_id=job["_id"],
            shard_key=claim.shard_key,
            token=claim.token,
        ),
    )


def identified(pipeline: Pipeline[Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as they are stored: cleaned (None dropped), `_id` the pipeline's identity."""
    kept = []
    for record in records:
        cleaned = pipeline.clean(record)
        if cleaned is not None:
            cleaned["_id"] = pipeline.identity(cleaned)
            kept.append(cleaned)
    return kept


def _shown(cursor: Any) -> str:
    """A cursor for logs: its JSON text, cut short."""
    text = json.dumps(cursor, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _cursor_key(cursor: Any) -> bytes:
    """A cursor's identity as its canonical JSON (a tuple and the list it is stored as are one
    cursor), digested so a long run keeps 16 bytes per batch."""
    try:
        text = json.dumps(cursor, sort_keys=True, default=str)
    except (TypeError, ValueError):  # keys of mixed types, a cycle: BSON refuses it at the commit anyway
        text = repr(cursor)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _attribute(cursor: Any) -> Any:
    """A cursor as a span attribute: a number or text as it is, anything else as JSON text."""
    return cursor if isinstance(cursor, (bool, int, float, str)) else _shown(cursor)


def _stopped(runner: ShardRunner, claim: Claim, heartbeat: Heartbeat, records: int) -> Outcome:
    """The heartbeat stopped renewing: end at this batch boundary, as cancelled if that is why."""
    if heartbeat.cancel_seen.is_set() and runner.leases.cancel(claim):
        logger.info("shard %s: cancelled after %d records (seen by the heartbeat)", claim.shard_key, records)
        return Outcome("cancelled", claim, records)
    if heartbeat.overran.is_set():
        # The lease was left to expire: the scheduler's reaper re-dispatches the shard, and the
        # attempt stays counted, so a batch that always overruns ends as poison in the DLQ.
        logger.warning("shard %s: stopped after a batch overran its time bound", claim.shard_key)
    return Outcome("lease_lost", claim, records)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
    ceiling = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def retry_time(delay_s: float) -> datetime:
    return clock.utcnow() + timedelta(seconds=delay_s)
