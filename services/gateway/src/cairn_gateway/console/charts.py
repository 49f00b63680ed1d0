"""Numbers the console draws: progress percentages and records/s series, as inline SVG paths.

Plain functions over the JSON the public API answers. A records/s series is estimated from
intervals (a shard or a job: its start, its end or now, the records it has done), each spread
evenly over its interval, summed per time bucket: the API keeps no time series, and a page needs
none of its own (docs/design.md, "The web console").
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TERMINAL_JOB_STATES = frozenset({"SUCCESS", "FAILURE", "CANCELLED"})


@dataclass(frozen=True)
class Span:
    """Records done over an interval: `start`/`end` in epoch seconds (end >= start)."""

    start: float
    end: float
    records: int


@dataclass(frozen=True)
class Series:
    """A records/s series: `points` as (epoch seconds at the bucket's middle, records/s)."""

    start: float
    end: float
    points: list[tuple[float, float]]

    @property
    def peak(self) -> float:
        return max((rate for _, rate in self.points), default=0.0)


@dataclass(frozen=True)
class Plot:
    """A series laid out in a `width` x `height` box (SVG user units, y down): `line` is an SVG
    polyline `points` attribute, `area` the closed polygon under it."""

    width: int
    height: int
    line: str
    area: str
    peak: float
    start: float
    end: float

    @property
    def start_label(self) -> str:
        return clock_label(self.start)

    @property
    def end_label(self) -> str:
        return clock_label(self.end)


def clock_label(moment: float) -> str:
    """Epoch seconds as `HH:MM:SS` UTC (the axis labels of a plot)."""
    return datetime.fromtimestamp(moment, UTC).strftime("%H:%M:%S")


def parse_time(value: Any) -> float | None:
    """An API timestamp (ISO 8601, `Z` or offset; zone-less is UTC) as epoch seconds; None if absent
    or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def percent(done: float, total: float) -> float:
    """`done` of `total` in percent, clamped to [0, 100]; 0 when total is not positive."""
    if total <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * done / total))


def shard_percent(shard: dict[str, Any]) -> float:
    """A shard's progress in percent (a `ShardView` of `GET /v1/jobs/{id}`): 100 once SUCCEEDED,
    else its checkpoint cursor (or, for a cursor that is not a key, its records) over its key range."""
    if shard.get("state") == "SUCCEEDED":
        return 100.0
    start, end, cursor = shard.get("range_start"), shard.get("range_end"), shard.get("cursor")
    if not isinstance(start, int) or not isinstance(end, int) or end <= start:
        return 0.0
    if isinstance(cursor, int) and not isinstance(cursor, bool):
        return percent(cursor - start, end - start)
    return percent(int(shard.get("records_done") or 0), end - start)


def shard_spans(shards: Iterable[dict[str, Any]], now: float) -> list[Span]:
    """The started shards as spans: started_at → finished_at (or `now` while running)."""
    spans = []
    for shard in shards:
        start = parse_time(shard.get("started_at"))
        if start is None:
            continue
        end = parse_time(shard.get("finished_at")) or now
        spans.append(Span(start, max(start, end), int(shard.get("records_done") or 0)))
    return spans


def job_span(job: dict[str, Any], records: int | None, now: float) -> Span | None:
    """A job (a `JobSummary`) as one span: started_at → finished_at (or `now`), with `records`
    done (None: unknown, no span)."""
    start = parse_time(job.get("started_at"))
    if start is None or records is None:
        return None
    end = parse_time(job.get("finished_at")) or now
    return Span(start, max(start, end), records)


def throughput(spans: Sequence[Span], start: float, end: float, buckets: int = 60) -> Series:
    """Records/s in `buckets` equal buckets over [start, end]: each span's records spread evenly
    over its interval (a zero-length span counts in the bucket it falls in)."""
    width = max(end - start, 1.0) / buckets
    totals = [0.0] * buckets
    for span in spans:
        if span.records <= 0 or span.end < start or span.start > end:
            continue
        duration = span.end - span.start
        if duration <= 0:
            index = min(buckets - 1, max(0, int((span.start - start) / width)))
            totals[index] += span.records
            continue
        rate = span.records / duration
        first = max(0, int((span.start - start) / width))
        last = min(buckets - 1, int((span.end - start) / width))
        for index in range(first, last + 1):
            low = start + index * width
            overlap = min(span.end, low + width) - max(span.start, low)
            if overlap > 0:
                totals[index] += rate * overlap
    points = [(start + (index + 0.5) * width, total / width) for index, total in enumerate(totals)]
    return Series(start, start + width * buckets, points)


def plot(series: Series, width: int = 600, height: int = 120) -> Plot:
    """`series` scaled into a box, the peak at the top (a flat zero line when there is none)."""
    peak = series.peak
    span = max(series.end - series.start, 1e-9)
    coordinates = []
    for moment, rate in series.points:
        x = (moment - series.start) / span * width
        y = height - (rate / peak * (height - 4) if peak > 0 else 0.0)
        coordinates.append(f"{x:.1f},{y:.1f}")
    line = " ".join(coordinates)
    area = f"0,{height} {line} {width},{height}" if coordinates else ""
    return Plot(width, height, line, area, peak, series.start, series.end)


def now_s() -> float:
    return datetime.now(UTC).timestamp()
