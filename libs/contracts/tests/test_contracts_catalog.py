"""The pipeline catalog: a job's params checked against the announced JSON Schema (field errors
located at the field), its work space resolved to an interval, and the plan bound (issue 11,
item 8: at most MAX_ITEMS_PER_JOB lease-frontier items, naming `sharding.item_size`).

The pipelines here are cairn_sdk classes of the test: the catalog knows them only as data."""

from datetime import datetime
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from cairn_contracts.jobs import JOB_SPEC_ADAPTER, MAX_ITEMS_PER_JOB, lease_frontier_items
from cairn_contracts.namespaces import JobCollection
from cairn_contracts.pipelines import CatalogEntry, CatalogRefusal, catalog_document, check_job, unknown_pipeline
from cairn_sdk import Batch, KeyRange, Pipeline, Single, TimeRange, WorkItems

MAX_KEY = 2**62


class CountParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = Field(0, ge=0)
    count: int = Field(..., ge=1)


class Counted(Pipeline[CountParams]):
    name = "counted"
    Params = CountParams
    space = KeyRange("start", None, count_field="count")

    def read(self, bounds: Any, cursor: Any, limit: int) -> Batch:
        return Batch([], bounds.end, done=True)


class CopyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: JobCollection = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,120}$")
    start: int | None = None
    end: int | None = None
    since: datetime | None = None
    until: datetime | None = None


class Copy(Counted):
    name = "copy"
    Params = CopyParams  # type: ignore[assignment]
    space = (KeyRange("start", "end"), TimeRange("since", "until"))


class ListParams(BaseModel):
    urls: list[str] = Field(default_factory=list)
    token: str | None = None


class Listed(Counted):
    name = "listed"
    Params = ListParams  # type: ignore[assignment]
    space = (WorkItems("urls"), Single())


def entry(pipeline: type[Pipeline[Any]]) -> CatalogEntry:
    """The entry as the gateway reads it: through the stored document."""
    return CatalogEntry.from_document({"_id": pipeline.name, **catalog_document(pipeline.catalog_entry(), "w1", 1)})


def spec(pipeline: str, params: dict, **fields: Any) -> Any:
    return JOB_SPEC_ADAPTER.validate_python({"pipeline": pipeline, "params": params, **fields})


def refusal(pipeline: type[Pipeline[Any]], params: dict, **fields: Any) -> list[dict]:
    job = spec(pipeline.name, params, **fields)
    with pytest.raises(CatalogRefusal) as caught:
        check_job(entry(pipeline), job.params, job.sharding)
    return caught.value.errors


def test_the_stored_entry_round_trips_the_schema_with_its_defs() -> None:
    read = entry(Copy)

    assert read.params_schema == CopyParams.model_json_schema()
    assert read.space == [
        {"kind": "key_range", "start_field": "start", "end_field": "end", "count_field": None},
        {"kind": "time_range", "start_field": "since", "end_field": "until"},
    ]


@pytest.mark.parametrize(
    "params, loc, kind",
    [
        ({"count": 0}, ["body", "params", "count"], "minimum"),
        ({"count": "ten"}, ["body", "params", "count"], "type"),
        ({}, ["body", "params", "count"], "missing"),
        ({"count": 1, "colour": "red"}, ["body", "params", "colour"], "extra_forbidden"),
    ],
)
def test_params_the_schema_refuses_are_located_at_the_field(params: dict, loc: list, kind: str) -> None:
    [error] = refusal(Counted, params)

    assert (error["loc"], error["type"]) == (loc, kind)


# The last two pass `datetime.fromisoformat` (ISO 8601 basic and week dates) and fail pydantic.
@pytest.mark.parametrize("since", ["yesterday", "2026-13-01T00:00:00Z", "2026-06-01 25:00", "20260601T000000Z", "2026-W22-1"])
def test_a_value_not_in_the_fields_format_is_refused_at_the_field(since: str) -> None:
    """`format: date-time` (pydantic's datetime) is checked at submit, not first by the worker."""
    [error] = refusal(Copy, {"collection": "events", "since": since, "until": "2026-06-02T00:00:00Z"})

    assert (error["loc"], error["type"]) == (["body", "params", "since"], "format")
    with pytest.raises(ValueError):
        CopyParams.model_validate({"collection": "events", "since": since})  # and the worker agrees


@pytest.mark.parametrize("since", ["2026-06-01T00:00:00Z", "2026-06-01T00:00:00+02:00", "2026-06-01T00:00:00", "2026-06-01"])
def test_every_date_time_form_the_worker_parses_is_accepted(since: str) -> None:
    job = spec("copy", {"collection": "events", "since": since, "until": "2026-06-02T00:00:00Z"})
    assert check_job(entry(Copy), job.params, job.sharding)["kind"] == "time_range"
    CopyParams.model_validate({"collection": "events", "since": since})  # and the worker agrees


@pytest.mark.parametrize("collection", ["jobs", "pipelines", "api_keys", "system.users", "raw_payload_blobs.files"])
def test_a_control_collection_is_refused_by_the_schema_alone(collection: str) -> None:
    [error] = refusal(Copy, {"collection": collection, "start": 0, "end": 5})

    assert error["loc"] == ["body", "params", "collection"]
    assert "Cairn's own collections" in error["msg"]


def test_an_unknown_pipeline_lists_the_known_ones() -> None:
    [error] = unknown_pipeline("ftp_dump", ["copy", "counted"]).errors

    assert error["loc"] == ["body", "pipeline"] and error["type"] == "unknown_pipeline"
    assert "ftp_dump" in error["msg"] and "copy, counted" in error["msg"]


def test_the_space_is_resolved_from_the_first_descriptor_whose_fields_are_set() -> None:
    counted = spec("counted", {"count": 25, "start": 100})
    by_keys = spec("copy", {"collection": "src", "start": -5, "end": 7})
    by_time = spec("copy", {"collection": "src", "since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00+00:00"})
    listed = spec("listed", {"urls": ["a", "b", "c"]})
    single = spec("listed", {"token": "t"})

    assert {k: v for k, v in check_job(entry(Counted), counted.params, counted.sharding).items() if k in ("kind", "start", "end")} == {
        "kind": "key_range", "start": 100, "end": 125,
    }
    assert check_job(entry(Copy), by_keys.params, by_keys.sharding)["end"] == 7
    window = check_job(entry(Copy), by_time.params, by_time.sharding)
    assert (window["kind"], window["start"], window["end"] - window["start"]) == ("time_range", 1767225600000, 86_400_000)
    items = check_job(entry(Listed), listed.params, listed.sharding)
    assert (items["kind"], items["start"], items["end"]) == ("work_items", 0, 3)
    assert check_job(entry(Listed), single.params, single.sharding)["kind"] == "single"
    # Schema defaults count: `start` is 0 when left out.
    assert check_job(entry(Counted), {"count": 4}, counted.sharding)["start"] == 0


@pytest.mark.parametrize(
    "params, loc",
    [
        ({"collection": "src", "start": 9, "end": 3}, ["body", "params", "end"]),
        ({"collection": "src", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, ["body", "params", "until"]),
        ({"collection": "src"}, ["body", "params"]),
    ],
)
def test_an_empty_or_missing_space_is_refused_naming_the_field(params: dict, loc: list) -> None:
    [error] = refusal(Copy, params)

    assert error["loc"] == loc


def frontier(item_size: int | None = None) -> dict:
    sharding = {"strategy": "lease_frontier", "shards": 4}
    return sharding if item_size is None else {**sharding, "item_size": item_size}


@pytest.mark.parametrize(
    "pipeline, params, sharding",
    [
        (Counted, {"count": 10**9}, frontier(1)),
        (Counted, {"count": 10**9}, frontier()),  # default item_size 10,000
        (Counted, {"count": MAX_ITEMS_PER_JOB + 1}, frontier(1)),
        (Copy, {"collection": "src", "start": -MAX_KEY, "end": MAX_KEY}, frontier(10**9)),
    ],
)
def test_a_plan_of_too_many_items_is_refused_naming_item_size(pipeline: type, params: dict, sharding: dict) -> None:
    [error] = refusal(pipeline, params, sharding=sharding)

    assert error["type"] == "too_many_items"
    assert error["loc"] == ["body", "sharding", "item_size"]
    assert "at most 10000" in error["msg"] and "item_size" in error["msg"]


def test_exactly_the_maximum_is_accepted_and_range_and_hash_mod_are_bounded_by_their_shards() -> None:
    for sharding in (frontier(1), {"strategy": "range", "shards": 1024}, {"strategy": "hash_mod", "shards": 1024}):
        job = spec("counted", {"count": MAX_ITEMS_PER_JOB}, sharding=sharding)
        assert check_job(entry(Counted), job.params, job.sharding)["end"] == MAX_ITEMS_PER_JOB


def test_item_count_is_exact_for_keys_beyond_a_floats_precision() -> None:
    assert lease_frontier_items((-MAX_KEY, MAX_KEY), 3) == -(-2 * MAX_KEY // 3)
    assert lease_frontier_items((0, 2**62 + 1), 2**61) == 3
