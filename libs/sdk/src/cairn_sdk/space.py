"""The work space of a job: what shards split, declared as data so Cairn plans without pipeline code.

A pipeline's `space` is one descriptor or a tuple of them; the first whose fields are all set
(not null) in a job's params (schema defaults filled in) applies (`Single()` always does). Each descriptor maps the params to
a half-open integer interval [start, end) that every sharding strategy (range, hash_mod,
lease_frontier) splits:

- `KeyRange`: integer keys, [params[start_field], params[end_field]) or, with `count_field`,
  [start, start + params[count_field]).
- `TimeRange`: datetime params, planned as epoch milliseconds [since, until).
- `WorkItems`: a list param; the interval is its indices [0, len(list)).
- `Single`: [0, 1), one shard; the pipeline pages by its cursor alone and says when it is done.

`describe()` gives the JSON form announced in the catalog (`{"kind": "key_range", ...}`).
"""

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar


@dataclass(frozen=True)
class KeyRange:
    kind: ClassVar[str] = "key_range"
    start_field: str = "start"
    end_field: str | None = "end"
    count_field: str | None = None  # set it (and end_field=None) for [start, start + count)

    def fields(self) -> tuple[str, ...]:
        return tuple(name for name in (self.start_field, self.end_field, self.count_field) if name)


@dataclass(frozen=True)
class TimeRange:
    kind: ClassVar[str] = "time_range"
    start_field: str = "since"
    end_field: str = "until"

    def fields(self) -> tuple[str, ...]:
        return (self.start_field, self.end_field)


@dataclass(frozen=True)
class WorkItems:
    kind: ClassVar[str] = "work_items"
    field: str = "items"

    def fields(self) -> tuple[str, ...]:
        return (self.field,)


@dataclass(frozen=True)
class Single:
    kind: ClassVar[str] = "single"

    def fields(self) -> tuple[str, ...]:
        return ()


Space = KeyRange | TimeRange | WorkItems | Single


def describe(space: Space | tuple[Space, ...]) -> list[dict[str, Any]]:
    """The catalog form of a pipeline's space: a list of `{"kind": ..., <fields>}` dicts, in order."""
    spaces = space if isinstance(space, tuple) else (space,)
    return [{"kind": item.kind, **asdict(item)} for item in spaces]


class SpaceError(ValueError):
    """The params give an empty or malformed interval; `field` names the param at fault."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Interval:
    """The interval a job's params give, with the descriptor (catalog form) that gave it."""

    space: dict[str, Any]
    start: int
    end: int  # exclusive


def resolve(spaces: list[dict[str, Any]], params: dict[str, Any]) -> Interval:
    """The interval of the first descriptor (catalog form, see `describe`) whose fields are all
    set in `params` (a JSON object, defaults filled in). Raises SpaceError naming the field when
    no descriptor applies or the interval is empty (end <= start)."""
    for space in spaces:
        kind = space.get("kind")
        names = [space[key] for key in ("start_field", "end_field", "count_field", "field") if space.get(key)]
        if any(params.get(name) is None for name in names):
            continue
        if kind == Single.kind:
            return Interval(space, 0, 1)
        if kind == WorkItems.kind:
            items = params[space["field"]]
            if not isinstance(items, list) or not items:
                raise SpaceError(space["field"], "give at least one item")
            return Interval(space, 0, len(items))
        if kind == KeyRange.kind:
            start = _integer(params, space["start_field"])
            if space.get("count_field"):
                end_field, end = space["count_field"], start + _integer(params, space["count_field"])
            else:
                end_field, end = space["end_field"], _integer(params, space["end_field"])
        elif kind == TimeRange.kind:
            start, end_field = epoch_ms(params[space["start_field"]], space["start_field"]), space["end_field"]
            end = epoch_ms(params[end_field], end_field)
        else:
            raise SpaceError(None, f"unknown space kind {kind!r}")
        if end <= start:
            raise SpaceError(end_field, f"{end_field} must be greater than {space['start_field']}")
        return Interval(space, start, end)
    wanted = " or ".join("+".join(s[k] for k in ("start_field", "end_field", "count_field", "field") if s.get(k)) or "nothing" for s in spaces)
    raise SpaceError(None, f"the params name no work space: set {wanted}")


def _integer(params: dict[str, Any], name: str) -> int:
    value = params[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpaceError(name, f"{name} must be an integer")
    return value


def epoch_ms(value: Any, name: str = "value") -> int:
    """Epoch milliseconds of a datetime or an ISO 8601 string (naive ones are UTC). Raises SpaceError."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as error:
            raise SpaceError(name, f"{name} is not an ISO 8601 datetime") from error
    if not isinstance(value, datetime):
        raise SpaceError(name, f"{name} must be a datetime")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def from_epoch_ms(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds `ms`."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
