"""Bundles: small shards sent several to one task.

A shard's fixed cost does not shrink with the shard: a Celery task (a confirmed publish, a
delivery and its ack), its claim and its checkpoint's adoption. A job cut into many small shards
spent more on those than on its records (issue 14: 1,024 shards of 64 records took 4.8x the
time of 8 shards of 8,192). So shards expected to fit in one batch (`records_estimate` at most
the job's `batch_size`) are sent in bundles (`RunShards`) of about one batch of records, at most
`max_shards` each; the worker claims a bundle's shards in bulk and runs them one after another,
each still a shard of its own (its checkpoint, fencing token, attempts, outcome and event).
Larger shards, and shards whose size is unknown, go one task each: their batches dwarf that cost.
A bundle counts once towards a tenant's in-flight cap, as one task (fairness.py).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from cairn_contracts.messages import MAX_BUNDLE_SHARDS, RunShard, RunShards


@dataclass(frozen=True)
class PlannedShard:
    """A PLANNED shard as dispatch sees it: its key, its expected records (0: unknown) and its
    index in the job."""

    shard_key: str
    records_estimate: int
    index: int = 0


def fits_one_batch(records_estimate: int, batch_size: int) -> bool:
    """Whether a shard of `records_estimate` records (0: unknown) is small: sent in a bundle."""
    return 0 < records_estimate <= batch_size


def shard_tasks(job_id: str, shards: Sequence[PlannedShard], batch_size: int, max_shards: int = MAX_BUNDLE_SHARDS) -> list[RunShard | RunShards]:
    """The tasks that send `shards` (of job `job_id`, in the order given): consecutive small
    shards bundled while their estimates add up to at most `batch_size` records (and at most
    `max_shards`, capped at MAX_BUNDLE_SHARDS; 1: no bundles), every other shard a RunShard.
    A bundle of one is a RunShard."""
    limit = max(1, min(max_shards, MAX_BUNDLE_SHARDS))
    tasks: list[RunShard | RunShards] = []
    bundle: list[str] = []
    records = 0

    def close() -> None:
        if len(bundle) == 1:
            tasks.append(RunShard(job_id=job_id, shard_key=bundle[0]))
        elif bundle:
            tasks.append(RunShards(job_id=job_id, shard_keys=list(bundle)))
        bundle.clear()

    for shard in shards:
        small = fits_one_batch(shard.records_estimate, batch_size)
        if not small or limit == 1:
            close()  # the tasks keep the shards' order
            records = 0
            tasks.append(RunShard(job_id=job_id, shard_key=shard.shard_key))
            continue
        if bundle and (records + shard.records_estimate > batch_size or len(bundle) >= limit):
            close()
            records = 0
        bundle.append(shard.shard_key)
        records += shard.records_estimate
    close()
    return tasks
