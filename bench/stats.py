"""Small statistics for benchmark figures: median and spread over repeated runs, percentiles."""

import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) with linear interpolation between the closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread of one figure over repeated runs.

    `spread_pct` is (max - min) / median: with the 3 to 5 repeats a benchmark can afford, the
    full range says more than a standard deviation would.
    """
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "spread_pct": None, "values": []}
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = (high - low) / median * 100 if median else 0.0
    return {
        "n": len(values),
        "median": float(median),
        "min": float(low),
        "max": float(high),
        "spread_pct": round(spread, 1),
        "values": [float(v) for v in values],
    }


def fmt_summary(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    """`12,345 (11,900–12,700)`: median and range, for tables."""
    if not s or s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:,.{digits}f}{unit}"
    return f"{s['median']:,.{digits}f}{unit} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"
