"""The gateway's domain errors: what the services (jobs.py, schedules.py, dlq.py, auth.py,
limits.py) raise. They know nothing of HTTP; problems.py is the one place that turns each kind
into a status code and a Problem body (docs/design.md, "Error answers").

Kinds and the status problems.py gives them:

- `NotFound` (404): no such job, schedule, key, dead letter or command *for this tenant*;
- `Conflict` (409): the resource is in a state the action cannot start from;
- `Gone` (410): it existed, and is no longer kept (an expired result);
- `Invalid` (422): a value the request schema accepts but the service refuses (`field` names it,
  as a validation error's `loc`: `("query", "cursor")`, `("body", "at")`);
- `NotConfirmed` (503): the broker did not confirm a command; nothing was requested;
- `Unauthorized` (401), `Forbidden` (403), `RateLimited` (429): the caller's API key (429 also
  for a tenant's running-jobs quota: tenants.py `QuotaExceeded`).
"""

from typing import Any


class DomainError(Exception):
    """Base of every error a gateway service raises on purpose; `str(error)` is the detail shown.

    `at`: the request part at fault when the error says so by its kind (a header), else None and
    problems.py points at the path parameter holding `ident` (the id the error is about)."""

    at: tuple[str | int, ...] | None = None
    ident: str | None = None


class NotFound(DomainError):
    def __init__(self, detail: str, ident: str) -> None:
        super().__init__(detail)
        self.ident = ident  # the id asked for: problems.py points `loc` at the path parameter holding it


class Conflict(DomainError):
    def __init__(self, detail: str, ident: str | None = None) -> None:
        super().__init__(detail)
        self.ident = ident


class Gone(DomainError):
    def __init__(self, detail: str, ident: str) -> None:
        super().__init__(detail)
        self.ident = ident


class Invalid(DomainError):
    """A refused value; answered like a request validation error (`detail: [{loc, msg, type}]`).

    `field` is where it is, as a validation error's `loc` (`("body", "at")`); `kind` the error's
    `type`; `value`, when given, is echoed as `input`. `errors` holds the field errors, one for
    this constructor, several from `Invalid.of` (a pydantic `ValidationError`'s, relocated).
    """

    def __init__(self, detail: str, field: tuple[str | int, ...], kind: str = "value_error", value: Any = None) -> None:
        super().__init__(detail)
        error: dict[str, Any] = {"loc": list(field), "msg": detail, "type": kind}
        if value is not None:
            error["input"] = value
        self.errors = [error]

    @classmethod
    def of(cls, errors: list[dict[str, Any]]) -> "Invalid":
        invalid = cls(errors[0]["msg"] if errors else "invalid", tuple(errors[0]["loc"]) if errors else ("body",))
        invalid.errors = errors
        return invalid


class NotConfirmed(DomainError):
    """The broker did not confirm a command: nothing was requested (the request may be repeated)."""


class Unauthorized(DomainError):
    """No API key, or one unknown or revoked."""

    at = ("header", "Authorization")


class Forbidden(DomainError):
    """The API key lacks the scope the call needs."""

    at = ("header", "Authorization")


class RateLimited(DomainError):
    at: tuple[str | int, ...] | None = ("header", "Authorization")

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
