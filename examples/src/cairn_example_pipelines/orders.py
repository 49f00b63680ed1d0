"""`example_orders`: the orders of a (deterministic, simulated) shop API, by order number.

Everything a pipeline declares, in one place:

- `Params`: what a job gives (a pydantic model; its JSON Schema is announced and the gateway
  checks every job against it, so a wrong param is a 422 naming the field);
- `space`: how Cairn shards the work (here order numbers [first_order, last_order));
- `read`: one batch from a cursor the pipeline owns (here the next order number);
- `clean`: the record as stored (None drops it); `identity`: its business key (the stored `_id`);
- `failures`: which of its errors are worth a retry.

The "API" is a pure function of the order number, so a re-run reads the same orders: replace
`_fetch` by your client call.
"""

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cairn_sdk import Batch, Bounds, FailurePolicy, KeyRange, Pipeline, RetryableError


class ShopUnavailable(RetryableError):
    """The shop's API did not answer: worth another try (with backoff)."""


class OrdersParams(BaseModel):
    """The orders [first_order, last_order) of one shop, in one currency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shop: str = Field(..., pattern=r"^[a-z][a-z0-9-]{1,40}$", description="Shop id")
    first_order: int = Field(1, ge=1, description="First order number")
    last_order: int = Field(..., ge=2, le=10_000_000, description="Order number after the last one read")
    currency: Literal["EUR", "USD", "GBP"] = Field("EUR", description="Currency the totals are converted to")
    min_total_cents: int = Field(0, ge=0, description="Orders below this total are not stored")

    @model_validator(mode="after")
    def _non_empty(self) -> "OrdersParams":
        if self.last_order <= self.first_order:
            raise ValueError("last_order must be greater than first_order")
        return self


_RATES = {"EUR": 1.0, "USD": 1.08, "GBP": 0.86}


class OrdersPipeline(Pipeline[OrdersParams]):
    name = "example_orders"
    version = "1"
    description = "Orders of a shop by order number, totals converted to one currency (an example pipeline)"
    Params = OrdersParams
    space = KeyRange(start_field="first_order", end_field="last_order")
    failures = FailurePolicy(retryable=(ShopUnavailable,), max_attempts=4)

    def read(self, bounds: Bounds, cursor: Any, limit: int) -> Batch:
        first = int(cursor)
        last = min(bounds.end, first + limit)
        orders = [self._fetch(number) for number in range(first, last) if bounds.holds(number)]
        return Batch(orders, last, done=last >= bounds.end, position=last)

    def clean(self, record: dict[str, Any]) -> dict[str, Any] | None:
        total = round(record["total_eur_cents"] * _RATES[self.params.currency])
        if total < self.params.min_total_cents:
            return None
        return {
            "shop": self.params.shop,
            "number": record["number"],
            "status": record["status"].lower(),
            "total_cents": total,
            "currency": self.params.currency,
        }

    def identity(self, record: dict[str, Any]) -> str:
        # The business key: one stored record per shop and order, however often it is read.
        return f"{record['shop']}:{record['number']}"

    def _fetch(self, number: int) -> dict[str, Any]:
        digest = hashlib.blake2b(f"{self.params.shop}/{number}".encode(), digest_size=4).digest()
        cents = int.from_bytes(digest, "big") % 50_000
        return {"number": number, "status": ("PAID", "SHIPPED", "REFUNDED")[number % 3], "total_eur_cents": cents}
