"""The benchmark scenarios, in the order `all` runs them.

Each module has `NAME`, `add_arguments(parser)`, `run(ctx, args) -> dict` (JSON-ready figures),
`table(result) -> (headers, rows)` and `headline(result) -> dict`.
"""

from types import ModuleType

from bench.scenarios import broker, checkpoints, http_json, ingest, profile, recovery, scaling, submit

SCENARIOS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (ingest, scaling, checkpoints, submit, recovery, broker, profile, http_json)
}
