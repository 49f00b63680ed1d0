"""Where the CLI finds the gateway and its API key.

Precedence, first set wins: the command-line options (`--url`, `--api-key`), the environment
(`CAIRN_URL`, `CAIRN_API_KEY`), the config file (`--config`, else `CAIRN_CONFIG`, else
`~/.config/cairn/config.toml`), then the default URL `http://127.0.0.1:8000`. The file is TOML:

    url = "http://127.0.0.1:8000"
    api_key = "cairn_<key id>_<secret>"
    timeout_s = 30
"""

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CONFIG = Path("~/.config/cairn/config.toml")


class ConfigError(Exception):
    """The config file cannot be read, or holds a value of the wrong type."""


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str | None
    timeout_s: float = 30.0


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.expanduser()
    return Path(os.environ.get("CAIRN_CONFIG") or DEFAULT_CONFIG).expanduser()


def load_config(url: str | None = None, api_key: str | None = None, path: Path | None = None) -> Config:
    """The effective configuration (see the module docstring). Raises `ConfigError` for a file
    given explicitly that does not exist, or any file that is not valid TOML."""
    file_values: dict[str, object] = {}
    where = config_path(path)
    if where.exists():
        try:
            file_values = tomllib.loads(where.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{where}: {error}") from error
    elif path is not None:
        raise ConfigError(f"{where}: no such file")
    resolved_url = url or os.environ.get("CAIRN_URL") or file_values.get("url") or DEFAULT_URL
    resolved_key = api_key or os.environ.get("CAIRN_API_KEY") or file_values.get("api_key")
    timeout = file_values.get("timeout_s", 30.0)
    if not isinstance(resolved_url, str) or (resolved_key is not None and not isinstance(resolved_key, str)):
        raise ConfigError(f"{where}: url and api_key must be strings")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"{where}: timeout_s must be a positive number")
    return Config(url=resolved_url.rstrip("/"), api_key=resolved_key, timeout_s=float(timeout))
