"""Write modes in the job spec, the replace_window scope and the stale-record filter."""

import pytest
from pydantic import ValidationError

from cairn_contracts.jobs import JOB_SPEC_ADAPTER
from cairn_contracts.sinks import RUN_MS, WINDOW, stale_filter, window_key

SPEC = {"pipeline": "synthetic", "params": {"count": 10}}


def test_the_write_mode_defaults_to_insert_and_names_the_field_when_unknown() -> None:
    assert JOB_SPEC_ADAPTER.validate_python(SPEC).write_mode == "insert"
    assert JOB_SPEC_ADAPTER.validate_python({**SPEC, "write_mode": "replace_window"}).write_mode == "replace_window"
    with pytest.raises(ValidationError) as refused:
        JOB_SPEC_ADAPTER.validate_python({**SPEC, "write_mode": "merge"})
    assert [e["loc"] for e in refused.value.errors()] == [("write_mode",)]


def test_the_window_is_the_specs_or_the_pipeline_and_its_params() -> None:
    assert window_key({**SPEC, "window": "customers-full"}) == "customers-full"
    derived = window_key(SPEC)
    assert derived.startswith("synthetic:") and len(derived) == len("synthetic:") + 16
    # Key order does not matter, the params do; the rest of the spec (name, sharding...) does not.
    assert window_key({"pipeline": "synthetic", "params": {"count": 10}, "name": "x", "batch_size": 5}) == derived
    assert window_key({**SPEC, "params": {"count": 11}}) != derived


def test_stale_records_are_the_windows_older_runs() -> None:
    assert stale_filter("w", 1234) == {WINDOW: "w", RUN_MS: {"$lt": 1234}}
