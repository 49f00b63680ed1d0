"""What a pipeline is: a source read batch by batch over an integer key range, and a cleaner."""

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Batch:
    records: list[dict[str, Any]]
    next_cursor: int  # the first key not yet read; equals the shard's end once exhausted


class Pipeline(Protocol):
    def read(self, cursor: int, end: int, limit: int) -> Batch:
        """Read up to `limit` records with keys in [cursor, end), in key order."""
        ...

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record as it is to be stored (with a unique `_id`), or None to drop it."""
        ...
