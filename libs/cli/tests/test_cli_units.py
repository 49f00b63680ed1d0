"""The CLI's plain parts: config precedence, parameter parsing, progress arithmetic."""

from pathlib import Path

import pytest
import typer

from cairn_cli.config import DEFAULT_URL, ConfigError, load_config
from cairn_cli.main import _parse_params, _parse_params_from
from cairn_cli.watch import RateMeter, shard_fraction


def test_options_beat_the_environment_which_beats_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('url = "http://file:1/"\napi_key = "from-file"\ntimeout_s = 5\n')
    monkeypatch.delenv("CAIRN_URL", raising=False)
    monkeypatch.delenv("CAIRN_API_KEY", raising=False)
    assert load_config(path=config) == load_config(None, None, config)
    assert load_config(path=config).url == "http://file:1" and load_config(path=config).timeout_s == 5
    monkeypatch.setenv("CAIRN_URL", "http://env:2")
    monkeypatch.setenv("CAIRN_API_KEY", "from-env")
    assert (load_config(path=config).url, load_config(path=config).api_key) == ("http://env:2", "from-env")
    assert load_config("http://option:3", "from-option", config).api_key == "from-option"


def test_defaults_and_bad_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CAIRN_URL", "CAIRN_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CAIRN_CONFIG", str(tmp_path / "absent.toml"))
    assert load_config() .url == DEFAULT_URL and load_config().api_key is None
    with pytest.raises(ConfigError, match="no such file"):
        load_config(path=tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("url = \n")
    with pytest.raises(ConfigError):
        load_config(path=broken)
    typed = tmp_path / "typed.toml"
    typed.write_text("timeout_s = -1\n")
    with pytest.raises(ConfigError, match="timeout_s"):
        load_config(path=typed)


def test_params_are_json_when_they_parse_and_text_otherwise() -> None:
    assert _parse_params(["count=10", "name=abc", "flag=true", "keys=[1,2]"], '{"count": 1, "x": 2}') == {
        "count": 10, "name": "abc", "flag": True, "keys": [1, 2], "x": 2,
    }
    with pytest.raises(typer.BadParameter):
        _parse_params(["novalue"], None)
    with pytest.raises(typer.BadParameter):
        _parse_params(None, "[1]")


def test_params_from_are_param_equals_path_pairs() -> None:
    assert _parse_params_from(["count=result.records_written", "src.collection=target_collection"]) == {
        "count": "result.records_written", "src.collection": "target_collection",
    }
    for bad in ("count", "=result.x", "count="):
        with pytest.raises(typer.BadParameter):
            _parse_params_from([bad])


def test_shard_fraction_follows_the_checkpoint_cursor() -> None:
    assert shard_fraction({"range_start": 100, "range_end": 200, "cursor": 150, "state": "RUNNING"}) == (50, 100)
    assert shard_fraction({"range_start": 100, "range_end": 200, "cursor": None, "state": "QUEUED"}) == (0, 100)
    assert shard_fraction({"range_start": 100, "range_end": 200, "cursor": 120, "state": "SUCCEEDED"}) == (100, 100)
    assert shard_fraction({"state": "SUCCEEDED"}) == (1, 1)


def test_rate_meter_counts_records_per_second_over_its_window() -> None:
    now = [0.0]
    meter = RateMeter(window_s=10, clock=lambda: now[0])
    assert meter.add(0) == 0.0
    now[0] = 2.0
    assert meter.add(100) == 50.0
    now[0] = 20.0  # the old samples leave the window
    now_rate = meter.add(1000)
    assert now_rate == pytest.approx((1000 - 100) / 18)


def test_ids_are_one_path_segment_whatever_they_contain() -> None:
    """`cairn jobs cancel ../keys/<id>` must not become `POST /v1/keys/<id>/cancel`: an id read
    from a file or another command's output stays inside the path it was given for."""
    from typer.testing import CliRunner

    from cairn_cli.main import app
    from cairn_testkit.webhook_receiver import WebhookReceiver

    with WebhookReceiver([404]) as receiver:
        base = receiver.url.split("/", 3)[:3]
        result = CliRunner().invoke(app, ["--url", "/".join(base), "--api-key", "k", "jobs", "cancel", "../keys/abc"])
    assert result.exit_code == 1
    assert [r.path for r in receiver.received] == ["/v1/jobs/..%2Fkeys%2Fabc/cancel"]
