"""Time in the forms Cairn stores and sends it: the one place that reads the clock or parses a
stored moment.

Two forms are stored (docs/mongodb-stand-in.md):
- integer epoch milliseconds (`*_ms` fields): what queries compare and sort on, because integers
  compare the same on every MongoDB-wire server;
- datetimes, for people and the API. The MongoDB stand-in keeps a datetime written by `$set` as
  ISO-8601 text, so a datetime read back may be a `datetime` or a `str`.

A naive datetime is read as UTC everywhere; every datetime returned here is aware, in UTC.
"""

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def now_ms() -> int:
    """Now, in integer epoch milliseconds."""
    return to_ms(utcnow())


def as_utc(moment: datetime) -> datetime:
    """The same instant as an aware UTC datetime (a naive one is read as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def to_ms(moment: datetime) -> int:
    """A datetime (naive: UTC) in integer epoch milliseconds (sub-millisecond part dropped)."""
    return int(as_utc(moment).timestamp() * 1000)


def from_ms(ms: int | float) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def iso(moment: datetime) -> str:
    """ISO-8601 text of a datetime (naive: UTC) in UTC, with its `+00:00` offset."""
    return as_utc(moment).isoformat()


def parse_moment(value: object) -> datetime | None:
    """A stored or sent moment as an aware UTC datetime: a datetime (naive: UTC) or ISO-8601 text
    (a trailing `Z` accepted). None for anything else, including text that is not a moment."""
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str) and value:
        try:
            return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def stored_ms(value: object) -> int | None:
    """A stored moment in integer epoch milliseconds, whatever form the server kept it in: a number
    (already epoch ms: the `*_ms` fields), a datetime or ISO-8601 text (see `parse_moment`).
    None for anything else (booleans, None, unparseable text)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    moment = parse_moment(value)
    return to_ms(moment) if moment is not None else None


def from_ms_field(value: object) -> datetime | None:
    """A stored `*_ms` field as an aware UTC datetime; None when it is missing or not an integer."""
    return from_ms(value) if isinstance(value, int) and not isinstance(value, bool) else None
