"""The retry decision for a failed shard run: classify the error, then back off within the policy.

The policy of a job is resolved field by field: the job spec's `retry` → the pipeline's declared
default (the `FailurePolicy`'s max_attempts, base_delay_s, max_delay_s) → the worker's settings. Attempts count since the shard was
planned or last replayed (a replay resets them: see docs/design.md).

Every scheduled retry is recorded on the shard (`retries`, the last `RETRIES_KEPT`), in the same
fenced write that sets it to RETRY, so status and tests can see each retry's attempt, delay and
backoff ceiling. Times are epoch milliseconds (queried and compared the same on every server).
"""

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymongo.collection import Collection

from cairn_contracts import clock
from cairn_contracts.jobs import RetryPolicy
from cairn_ingest_worker.errors import FailurePolicy, HttpStatusError, is_retryable
from cairn_ingest_worker.pipelines import failure_policy

RETRIES_KEPT = 20


@dataclass(frozen=True)
class EffectiveRetryPolicy:
    max_attempts: int
    base_delay_s: float
    max_delay_s: float


@dataclass(frozen=True)
class RetryDefaults:
    """The worker's settings: what applies when neither the job nor its pipeline says."""

    max_attempts: int
    base_delay_s: float
    max_delay_s: float


def resolve_policy(
    job_retry: RetryPolicy | Mapping[str, Any] | None, pipeline_retry: RetryPolicy | FailurePolicy | None, defaults: RetryDefaults
) -> EffectiveRetryPolicy:
    job = RetryPolicy.model_validate(job_retry) if isinstance(job_retry, Mapping) else job_retry

    def pick(field: str) -> Any:
        for source in (job, pipeline_retry):
            value = getattr(source, field, None) if source is not None else None
            if value is not None:
                return value
        return getattr(defaults, field)

    return EffectiveRetryPolicy(
        max_attempts=int(pick("max_attempts")),
        base_delay_s=float(pick("base_delay_s")),
        max_delay_s=float(pick("max_delay_s")),
    )


@dataclass(frozen=True)
class JobRetryRules:
    policy: EffectiveRetryPolicy
    declared: FailurePolicy  # what the job's pipeline declares about its errors


def rules_for_job(jobs: Collection, job_id: str, defaults: RetryDefaults, job: Mapping[str, Any] | None = None) -> JobRetryRules:
    """The retry policy and the pipeline's error declarations that apply to a job's shards.
    `job`: the job document (with its `spec`) if the caller has it already; else it is read."""
    if job is None:
        job = jobs.find_one({"_id": job_id}, {"spec": 1})
    spec = (job or {}).get("spec") or {}
    declared = failure_policy(str(spec.get("pipeline")))
    return JobRetryRules(resolve_policy(spec.get("retry"), declared, defaults), declared)


def backoff_ceiling(attempt: int, base_s: float, max_s: float) -> float:
    """The upper bound of the full-jitter delay after failed attempt `attempt` (1-based)."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class RetryDecision:
    retryable: bool
    retry: bool  # retryable and attempts left
    attempt: int
    max_attempts: int
    delay_s: float = 0.0
    ceiling_s: float = 0.0

    @property
    def dead_letter_reason(self) -> str:
        return "retries_exhausted" if self.retryable else "non_retryable"

    def record(self, error: str, now_ms: int | None = None) -> dict[str, Any]:
        at_ms = now_ms if now_ms is not None else clock.now_ms()
        return {
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "delay_s": round(self.delay_s, 6),
            "ceiling_s": round(self.ceiling_s, 6),
            "error": error[:500],
            "at_ms": at_ms,
            "retry_at_ms": at_ms + int(self.delay_s * 1000),
        }


def decide(
    error: BaseException,
    attempt: int,
    policy: EffectiveRetryPolicy,
    declared: FailurePolicy | None = None,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry (with a delay uniform in [0, ceiling]) or give up, after failed attempt `attempt`.

    An HTTP source's Retry-After, when given, lengthens the delay up to `max_delay_s`.
    """
    retryable = is_retryable(error, declared)
    if not retryable or attempt >= policy.max_attempts:
        return RetryDecision(retryable, False, attempt, policy.max_attempts)
    ceiling = backoff_ceiling(attempt, policy.base_delay_s, policy.max_delay_s)
    delay = (rng or random).uniform(0, ceiling)
    if isinstance(error, HttpStatusError) and error.retry_after_s:
        delay = max(delay, min(error.retry_after_s, policy.max_delay_s))
    return RetryDecision(retryable, True, attempt, policy.max_attempts, delay, ceiling)


def retry_fields(shard: Mapping[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The shard fields a scheduled retry sets: the bounded history and the retry in wait.

    The whole list is written (not $push): the write is fenced by the lease, so nobody else
    changes it meanwhile, and the MongoDB stand-in stores $push-ed documents as text.
    """
    history = [r for r in shard.get("retries") or [] if isinstance(r, dict)]
    return {"retries": [*history[-(RETRIES_KEPT - 1):], record], "retry": record}
