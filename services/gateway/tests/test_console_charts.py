"""The console's numbers (console/charts.py): shard progress and the records/s series it plots."""

import pytest

from cairn_gateway.console.charts import Span, parse_time, plot, shard_percent, shard_spans, throughput


def test_shard_percent_reads_the_checkpoint_over_the_key_range() -> None:
    assert shard_percent({"state": "RUNNING", "range_start": 100, "range_end": 300, "cursor": 150}) == 25.0
    assert shard_percent({"state": "SUCCEEDED", "range_start": 0, "range_end": 10, "cursor": None}) == 100.0
    # A cursor that is not a key (an opaque pipeline cursor): records done over the range instead.
    assert shard_percent({"state": "RUNNING", "range_start": 0, "range_end": 200, "cursor": "page-3", "records_done": 50}) == 25.0
    assert shard_percent({"state": "QUEUED", "range_start": None, "range_end": None}) == 0.0
    assert shard_percent({"state": "RUNNING", "range_start": 0, "range_end": 10, "cursor": 99}) == 100.0  # clamped


def test_throughput_spreads_each_span_evenly_over_its_buckets() -> None:
    # 100 records over [0, 10) and 50 over [5, 10): 10/s, then 20/s.
    series = throughput([Span(0, 10, 100), Span(5, 10, 50)], start=0, end=10, buckets=2)
    assert series.points == [(2.5, 10.0), (7.5, 20.0)]
    assert series.peak == 20.0
    # The records are all there, whatever the bucketing.
    fine = throughput([Span(1.3, 7.9, 660)], start=0, end=10, buckets=7)
    width = 10 / 7
    assert sum(rate * width for _, rate in fine.points) == pytest.approx(660)
    # Spans outside the window, empty ones and zero-length ones.
    assert throughput([Span(20, 30, 100), Span(0, 5, 0)], 0, 10, 5).peak == 0
    assert throughput([Span(4, 4, 10)], 0, 10, 5).points[2] == (5.0, 5.0)


def test_shard_spans_use_now_for_running_shards_and_skip_unstarted_ones() -> None:
    now = parse_time("2026-12-01T06:00:10Z")
    assert now is not None
    shards = [
        {"started_at": "2026-12-01T06:00:00Z", "finished_at": "2026-12-01T06:00:04Z", "records_done": 40},
        {"started_at": "2026-12-01T06:00:02+00:00", "finished_at": None, "records_done": 16},
        {"started_at": None, "records_done": 0},
    ]
    spans = shard_spans(shards, now)
    assert [(span.end - span.start, span.records) for span in spans] == [(4.0, 40), (8.0, 16)]
    assert parse_time("2026-12-01T06:00:00") == parse_time("2026-12-01T06:00:00Z")  # zone-less is UTC
    assert parse_time("not a time") is None


def test_plot_puts_the_peak_at_the_top_of_the_box() -> None:
    chart = plot(throughput([Span(0, 5, 50)], 0, 10, buckets=2), width=100, height=50)
    assert chart.line == "25.0,4.0 75.0,50.0"
    assert chart.area == "0,50 25.0,4.0 75.0,50.0 100,50"
    assert chart.peak == 10.0
    flat = plot(throughput([], 0, 10, buckets=2), width=100, height=50)
    assert flat.line == "25.0,50.0 75.0,50.0" and flat.peak == 0
