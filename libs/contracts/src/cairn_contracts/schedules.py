"""When a schedule fires: the timing both the gateway (which shows and validates it) and the
scheduler (which fires it) must agree on exactly, so it is defined once, like the job spec.

Kinds:
- `cron`: a 5-field cron expression evaluated in an IANA time zone by `cronsim`, with the
  Debian cron semantics on DST changes: a fixed-time job whose local time does not exist (spring
  forward) runs once right after the change, one whose local time exists twice (fall back) runs
  once, at the first of the two; jobs that run every hour or more often run at every real tick.
- `interval`: every `interval_s` seconds from an anchor: `start_at` when given, else one interval
  after the schedule was created (or its timing last changed).
- `once`: at `at`.

All three honour `start_at` (no run before), `end_at` (no run after) and `max_runs`.
Computation is in integer epoch milliseconds, the form the scheduler queries (`next_run_at_ms`).
"""

from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cairn_contracts.bounds import ContractModel, Moment
from cairn_contracts.clock import as_utc, from_ms, to_ms

ScheduleKind = Literal["cron", "interval", "once"]
# What a due run does while the schedule's previous run is still active (Temporal's overlap
# policies): skip it (default); buffer it, at most one, started when the previous run ends;
# start it anyway; or cancel the previous run and start this one once that has stopped.
OverlapPolicy = Literal["skip", "buffer_one", "allow_all", "cancel_other"]
OVERLAP_POLICIES: tuple[str, ...] = ("skip", "buffer_one", "allow_all", "cancel_other")
MAX_INTERVAL_S = 366 * 86_400


class ScheduleTiming(ContractModel):
    """When a schedule runs. Naive datetimes are read as UTC; every moment lies between
    cairn_contracts.bounds.MIN_MOMENT and MAX_MOMENT (else a 422 naming it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ScheduleKind = Field(description="cron (5-field expression in a time zone), interval (every N seconds) or once (at a time)")
    cron: str | None = Field(
        None, max_length=200, validate_default=True, description="kind=cron: minute hour day-of-month month day-of-week", examples=["*/5 * * * *"]
    )
    timezone: str = Field("UTC", max_length=64, description="kind=cron: IANA time zone the expression is read in", examples=["Europe/Berlin"])
    interval_s: int | None = Field(None, ge=1, le=MAX_INTERVAL_S, validate_default=True, description="kind=interval: seconds between runs")
    at: Moment | None = Field(None, validate_default=True, description="kind=once: when it runs")
    start_at: Moment | None = Field(None, description="No run before this moment (interval: the first run)")
    end_at: Moment | None = Field(None, description="No run after this moment")
    max_runs: int | None = Field(None, ge=1, le=1_000_000, description="Stop after this many scheduled runs")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind is None:  # the kind itself is invalid: that is the error to report
            return value
        if kind != "cron":
            if value is not None:
                raise ValueError("only a cron schedule has an expression")
            return None
        if value is None:
            raise ValueError("a cron schedule needs an expression")
        fields = value.split()
        if len(fields) != 5:
            raise ValueError("give 5 fields: minute hour day-of-month month day-of-week")
        try:
            CronSim(" ".join(fields), datetime(2000, 1, 1, tzinfo=UTC))
        except (CronSimError, ValueError) as error:
            raise ValueError(f"not a valid cron expression: {error}") from None
        return " ".join(fields)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("interval_s")
    @classmethod
    def _interval(cls, value: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind is None:  # the kind itself is invalid: that is the error to report
            return value
        if kind == "interval" and value is None:
            raise ValueError("an interval schedule needs interval_s")
        if kind != "interval" and value is not None:
            raise ValueError("only an interval schedule has interval_s")
        return value

    @field_validator("at")
    @classmethod
    def _at(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        kind = info.data.get("kind")
        if kind is None:  # the kind itself is invalid: that is the error to report
            return value
        if kind == "once" and value is None:
            raise ValueError("a one-off schedule needs `at`")
        if kind != "once" and value is not None:
            raise ValueError("only a one-off schedule has `at`")
        return as_utc(value) if value is not None else None

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return as_utc(value) if value is not None else None

    @model_validator(mode="after")
    def _window(self) -> "ScheduleTiming":
        if self.start_at is not None and self.end_at is not None and self.end_at <= self.start_at:
            raise ValueError("end_at must be after start_at")
        return self

    def anchor_ms(self, now_ms: int) -> int:
        """The phase of an interval schedule whose timing is set at `now_ms`."""
        if self.start_at is not None:
            return to_ms(self.start_at)
        return now_ms + 1000 * int(self.interval_s or 0)

    def next_run_ms(self, after_ms: int, *, anchor_ms: int, runs_done: int = 0) -> int | None:
        """The first run strictly after `after_ms`, or None when the schedule has no run left."""
        if self.max_runs is not None and runs_done >= self.max_runs:
            return None
        if self.start_at is not None:
            after_ms = max(after_ms, to_ms(self.start_at) - 1)
        if self.kind == "once":
            assert self.at is not None
            due: int | None = to_ms(self.at) if to_ms(self.at) > after_ms else None
        elif self.kind == "interval":
            step = 1000 * int(self.interval_s or 1)
            if anchor_ms > after_ms:
                due = anchor_ms
            else:
                due = anchor_ms + ((after_ms - anchor_ms) // step + 1) * step
        else:
            due = self._next_cron_ms(after_ms)
        if due is None or (self.end_at is not None and due > to_ms(self.end_at)):
            return None
        return due

    def _next_cron_ms(self, after_ms: int) -> int | None:
        assert self.cron is not None
        zone = ZoneInfo(self.timezone)
        # cronsim works at minute resolution and yields times strictly after its start.
        start = from_ms(after_ms).astimezone(zone)
        try:
            return to_ms(next(CronSim(self.cron, start)))
        except (StopIteration, CronSimError):
            return None  # an expression that never matches again (e.g. 30 February)
        except (OverflowError, ValueError):
            return None  # its next match lies past the years datetime can hold: no run left

    def timing_fields(self) -> dict[str, Any]:
        """The timing as stored in a schedules document (datetimes also as *_ms integers)."""
        fields = self.model_dump()
        for name in ("at", "start_at", "end_at"):
            value = getattr(self, name)
            fields[f"{name}_ms"] = to_ms(value) if value is not None else None
        return fields
