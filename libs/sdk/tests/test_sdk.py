"""cairn_sdk: the work-space descriptors and their intervals, bounds, the run context, the
in-process runner for pipeline tests."""

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from cairn_contracts.partitioning import stable_hash as cairns_hash
from cairn_sdk import (
    Batch,
    Bounds,
    Bucket,
    KeyRange,
    MissingSecret,
    NonRetryableError,
    Pipeline,
    RunContext,
    Single,
    SpaceError,
    TimeRange,
    WorkItems,
    describe,
    resolve,
    stable_hash,
)
from cairn_sdk.testing import drain


def test_describe_gives_the_catalog_form_in_order() -> None:
    assert describe((KeyRange("a", "b"), WorkItems("urls"), Single())) == [
        {"kind": "key_range", "start_field": "a", "end_field": "b", "count_field": None},
        {"kind": "work_items", "field": "urls"},
        {"kind": "single"},
    ]


def test_the_first_descriptor_whose_fields_are_set_applies() -> None:
    spaces = describe((KeyRange("start", "end"), TimeRange("since", "until"), Single()))

    assert (resolve(spaces, {"start": 3, "end": 9}).start, resolve(spaces, {"start": 3, "end": 9}).end) == (3, 9)
    window = resolve(spaces, {"since": "2026-01-01T00:00:00", "until": "2026-01-01T00:00:01Z", "start": None})
    assert (window.space["kind"], window.start, window.end - window.start) == ("time_range", 1767225600000, 1000)
    assert resolve(spaces, {}).space["kind"] == "single" and (resolve(spaces, {}).start, resolve(spaces, {}).end) == (0, 1)


@pytest.mark.parametrize(
    "spaces, params, field",
    [
        ((KeyRange("start", "end"),), {"start": 5, "end": 5}, "end"),
        ((KeyRange("start", None, count_field="n"),), {"start": 5, "n": 0}, "n"),
        ((KeyRange("start", "end"),), {"start": "5", "end": 9}, "start"),
        ((WorkItems("urls"),), {"urls": []}, "urls"),
        ((TimeRange(),), {"since": "yesterday", "until": "2026-01-01T00:00:00Z"}, "since"),
        ((KeyRange(),), {}, None),
    ],
)
def test_an_empty_or_malformed_interval_names_its_field(spaces: tuple, params: dict, field: str | None) -> None:
    with pytest.raises(SpaceError) as caught:
        resolve(describe(spaces), params)

    assert caught.value.field == field


def test_bounds_give_their_time_window_and_their_bucket() -> None:
    bounds = Bounds(1767225600000, 1767225660000, Bucket(4, 1))

    assert bounds.window() == (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 1, tzinfo=UTC))
    assert [bounds.holds(k) for k in range(40)].count(True) == sum(stable_hash(k) % 4 == 1 for k in range(40))
    assert Bounds(0, 1).holds("anything")


def test_the_sdk_hash_is_cairns_hash() -> None:
    assert all(stable_hash(key) == cairns_hash(key) for key in (0, 1, "syn-000000000007", "x" * 100))


def test_a_missing_secret_is_a_permanent_failure_that_does_not_show_the_others() -> None:
    context = RunContext(secrets={"api": "Bearer s3cr3t"})

    assert context.secret("api") == "Bearer s3cr3t"
    with pytest.raises(MissingSecret, match="'other'") as caught:
        context.secret("other")
    assert isinstance(caught.value, NonRetryableError) and "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in repr(context)


class PagesParams(BaseModel):
    pages: int


class Pages(Pipeline[PagesParams]):
    name = "pages"
    Params = PagesParams

    def start(self, bounds: Bounds) -> Any:
        return "page-0"

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        page = int(cursor.split("-")[1])
        last = page + 1 == self.params.pages
        return Batch([{"_id": f"r{page}"}], None if last else f"page-{page + 1}", done=last)


def test_drain_runs_a_pipeline_as_the_runner_does_until_it_is_done() -> None:
    assert [r["_id"] for r in drain(Pages, {"pages": 3})] == ["r0", "r1", "r2"]
    with pytest.raises(RuntimeError, match="not done"):
        drain(Pages, {"pages": 10}, max_batches=5)


def test_the_catalog_entry_says_what_the_gateway_checks() -> None:
    entry = Pages.catalog_entry()

    assert entry["name"] == "pages" and entry["version"] == "1" and entry["space"] == [{"kind": "single"}]
    assert entry["params_schema"]["required"] == ["pages"]
