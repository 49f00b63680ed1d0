"""What MongoDB (BSON) can store and the services can compute with, checked where input enters.

A value outside these bounds is the client's error, refused as a 422 naming the field, never found
out at the insert or in the scheduler's arithmetic (a 500, or a schedule that can never fire):

- text: BSON strings are UTF-8, so a lone UTF-16 surrogate (`"\\ud800"`, which JSON allows) can
  never be stored; `ContractModel` refuses it in every string field of a model, nested lists and
  dicts included.
- numbers: NaN and ±Infinity are not numbers any field means; `ContractModel` refuses them.
  Integers are BSON int64; every integer field carries its own `le=` bound below `INT64_MAX`.
- moments: `Moment` is a datetime between `MIN_MOMENT` and `MAX_MOMENT` (UTC): stored as BSON
  dates and as epoch milliseconds (int64), and far enough inside Python's year 1..9999 that
  cron and interval arithmetic a few years past it never overflows.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

INT64_MAX = 2**63 - 1
MIN_MOMENT = datetime(1900, 1, 1, tzinfo=UTC)
MAX_MOMENT = datetime(9000, 1, 1, tzinfo=UTC)


def has_surrogate(text: str) -> bool:
    """True when `text` holds a UTF-16 surrogate code point, which UTF-8 (and BSON) cannot hold."""
    return any("\ud800" <= char <= "\udfff" for char in text)


def check_storable(value: Any) -> Any:
    """`value` unchanged; ValueError when a string in it (at any depth) cannot be stored."""
    if isinstance(value, str):
        if has_surrogate(value):
            raise ValueError("text holds a lone UTF-16 surrogate, which cannot be stored as UTF-8")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            check_storable(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_storable(key)
            check_storable(item)
    return value


class ContractModel(BaseModel):
    """Base of every model whose values reach the store: finite numbers and storable text only.

    Subclasses set their own `model_config`; pydantic merges it with this one.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        return check_storable(value)


def bounded_moment(moment: datetime) -> datetime:
    """`moment` in UTC (naive ones are read as UTC); ValueError outside MIN_MOMENT..MAX_MOMENT."""
    try:
        utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 has no UTC form in Python's range
        utc = None
    if utc is None or not MIN_MOMENT <= utc <= MAX_MOMENT:
        raise ValueError(f"give a moment between {MIN_MOMENT.date()} and {MAX_MOMENT.date()} (UTC)")
    return utc


Moment = Annotated[datetime, AfterValidator(bounded_moment)]
