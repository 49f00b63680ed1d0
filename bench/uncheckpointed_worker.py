"""BENCHMARK ONLY: the ingest worker with leases that skip every checkpoint write but a shard's last one.

`python -m bench.uncheckpointed_worker` runs the production worker's wiring (bootstrap.py) with
`UncheckpointedLeases` injected, so that the `checkpoints` scenario of `make bench` can measure
what checkpointing every batch costs: the same job, the same worker, the same code path, minus the per-batch checkpoint write (`commit`: a fenced write of the checkpoint).

With these leases, a crash loses the whole shard's progress (it restarts from its first key and
every record it already stored counts as redone), a lost lease is only noticed by the heartbeat,
and a task slice that hands off early restarts its shard from the last checkpoint. That is the
price the benchmark puts a figure on; it is not a mode to run.
"""

import logging
from typing import Any

from cairn_ingest_worker.bootstrap import create_app, run_worker
from cairn_ingest_worker.leases import Claim, Commit, ShardLeases
from cairn_ingest_worker.settings import WorkerSettings
from cairn_ingest_worker.store import WriteCounts

logger = logging.getLogger(__name__)


class UncheckpointedLeases(ShardLeases):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._unrecorded: dict[tuple[str, int], tuple[int, WriteCounts]] = {}

    def commit(
        self, claim: Claim, cursor: Any, records: int, counts: WriteCounts, *, position: int | None = None, done: bool = False
    ) -> Commit:
        key = (claim.shard_key, claim.token)
        total, stored = self._unrecorded.pop(key, (0, WriteCounts()))
        total, stored = total + records, stored + counts
        if not done:
            self._unrecorded[key] = (total, stored)
            return Commit(stored=True)  # (a cancel is only seen at the shard's last batch)
        # The shard's last batch: one checkpoint write with the totals, so results stay right.
        return super().commit(claim, cursor, total, stored, position=position, done=done)


def main() -> None:
    settings = WorkerSettings()
    logger.warning("benchmark worker: checkpoints are written only at a shard's last batch")
    run_worker(create_app(settings, leases=UncheckpointedLeases), settings)


if __name__ == "__main__":
    main()
