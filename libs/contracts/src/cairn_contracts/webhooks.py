"""Job webhooks: the callback URL a job spec may name, and the signature of each delivery.

When a job that names `callback_url` reaches a terminal state, the scheduler POSTs a JSON body
there (cairn_scheduler/webhooks.py). The body is signed like Stripe's webhooks:

    Cairn-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>

A receiver recomputes the HMAC over the raw body with the shared secret (`CAIRN_WEBHOOK_SECRET`),
compares in constant time, and refuses timestamps older than a tolerance (5 minutes by default)
so a captured request cannot be replayed later. `verify` does all three.

The URL is tenant input that a server of Cairn will call, a classic SSRF vector: only `http` and
`https`, at most MAX_URL_LENGTH characters, no credentials in it; the deliverer also refuses
hosts that resolve to non-public addresses unless `CAIRN_WEBHOOK_ALLOW_PRIVATE_NETWORKS` is set.
"""

import hashlib
import hmac
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

MAX_URL_LENGTH = 2048
SIGNATURE_HEADER = "Cairn-Signature"
DELIVERY_HEADER = "Cairn-Webhook-Id"
ATTEMPT_HEADER = "Cairn-Webhook-Attempt"
EVENT_JOB_FINISHED = "job.finished"
DEFAULT_TOLERANCE_S = 300


def check_callback_url(value: str) -> str:
    """`value` if Cairn may POST to it; ValueError (a 422 naming the field) otherwise."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as error:
        raise ValueError(f"not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("only http and https callback URLs are allowed")
    if not parts.hostname:
        raise ValueError("the callback URL needs a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no credentials in the callback URL: deliveries are authenticated by their signature")
    if port == 0:
        raise ValueError("port 0 is not a valid callback port")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in value):
        raise ValueError("the callback URL contains whitespace or control characters")
    return value


CallbackUrl = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(check_callback_url)]


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `Cairn-Signature` header value of `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, now_s: float, tolerance_s: float = DEFAULT_TOLERANCE_S) -> bool:
    """Whether `header` is a valid signature of `body` made with `secret` within `tolerance_s`
    seconds of `now_s`. Several `v1=` entries are accepted (one per secret during a rotation)."""
    fields = [item.split("=", 1) for item in header.split(",") if "=" in item]
    stamps = [v for k, v in fields if k.strip() == "t"]
    candidates = [v.strip() for k, v in fields if k.strip() == "v1"]
    # ASCII digits, bounded: str.isdigit accepts "²" and int() refuses over 4300 digits (raises).
    if len(stamps) != 1 or not re.fullmatch(r"[0-9]{1,15}", stamps[0].strip()) or not candidates:
        return False
    timestamp = int(stamps[0])
    if abs(now_s - timestamp) > tolerance_s:
        return False
    expected = signature(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
