"""Tables on stdout, REPORT.md and PNG plots (temporary minimal version)."""

import sys
from pathlib import Path
from typing import Any

from bench.scenarios import SCENARIOS


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def print_tables(result: dict[str, Any]) -> None:
    for name, data in result["scenarios"].items():
        headers, rows = SCENARIOS[name].table(data)
        sys.stdout.write(f"\n{name}\n{_format_table(headers, rows)}\n")


def write(result: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "plots").mkdir(exist_ok=True)
    (out_dir / "REPORT.md").write_text("tbd\n")
