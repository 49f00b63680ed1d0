"""What a pipeline is: a source read batch by batch over an integer key range, and a cleaner."""

from dataclasses import dataclass
from typing import Any, Protocol

from cairn_contracts.partitioning import bucket_of


@dataclass(frozen=True)
class Bucket:
    """A hash-mod shard's share of the keys: those with stable_hash(key) % modulus == remainder."""

    modulus: int
    remainder: int

    def holds(self, key: str | int) -> bool:
        return bucket_of(key, self.modulus) == self.remainder


@dataclass(frozen=True)
class Batch:
    records: list[dict[str, Any]]
    next_cursor: int  # the first key not yet examined; equals the shard's end once exhausted


class Pipeline(Protocol):
    def read(self, cursor: int, end: int, limit: int) -> Batch:
        """Read up to `limit` records with keys in [cursor, end), in key order (only the
        bucket's own records when the pipeline was built for a hash-mod bucket)."""
        ...

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as it is to be stored (with a unique `_id`), or None to drop it."""
        ...
