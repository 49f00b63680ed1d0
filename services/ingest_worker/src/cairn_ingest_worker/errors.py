"""Which failures are worth retrying.

Transient trouble (network, timeouts, an unavailable store, HTTP 429 and 5xx) retries with
backoff; bad input, HTTP 4xx and programming errors go straight to the dead-letter queue.
A pipeline decides for itself in two ways: it raises `RetryableError` / `NonRetryableError`, or
it declares a `FailurePolicy` (its own retryable and non-retryable exception types, checked
before the defaults, and its default retry policy). Those types are the SDK's (cairn_sdk), the
one API pipelines import; they are re-exported here for the worker's own code.
"""

from bson.errors import InvalidDocument
from pymongo.errors import AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError

from cairn_sdk.errors import FailurePolicy, HttpStatusError, NonRetryableError, RetryableError

__all__ = [
    "BatchTimedOut",
    "CursorNotAdvanced",
    "FailurePolicy",
    "HttpStatusError",
    "NonRetryableError",
    "RetryableError",
    "StoreUnavailable",
    "classify_http_status",
    "is_retryable",
    "is_store_outage",
]


class CursorNotAdvanced(NonRetryableError):
    """The pipeline returned a batch that is not the last with the cursor it was given: reading
    on would loop forever (and store the same records again), so the shard is dead-lettered."""


class BatchTimedOut(TimeoutError):
    """One batch ran past its time bound (the task's soft time limit interrupted it). Retryable,
    so the shard's retry policy applies and a batch that always hangs ends in the DLQ."""


class StoreUnavailable(Exception):
    """Cairn's MongoDB cannot be reached: not the shard's fault, so no attempt is spent on it; the
    task keeps its delivery (a short retry) and the run resumes from its checkpoint.

    `claim`: the claim this run held when the store went away (None before any claim), so its
    lease can be handed back once the store answers again.
    """

    def __init__(self, error: BaseException, claim: object | None = None) -> None:
        super().__init__(f"MongoDB unreachable: {type(error).__name__}: {error}")
        self.error = error
        self.claim = claim


def is_store_outage(error: BaseException) -> bool:
    """True for the errors of a MongoDB that cannot be reached (no server selectable, connection
    refused or dropped). Inside a batch, a NetworkTimeout is a server that answered too slowly: a
    slow batch, which is a (retryable) failure of the shard, not an outage. (Outside a batch, any
    ConnectionFailure of Cairn's own bookkeeping is handled as an outage.)"""
    return isinstance(error, ConnectionFailure) and not isinstance(error, NetworkTimeout)


_RETRYABLE = (RetryableError, ConnectionError, TimeoutError, AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError)
# InvalidDocument: a record MongoDB can never store (a `$` or NUL in a key): retrying cannot help.
_NON_RETRYABLE = (NonRetryableError, ValueError, TypeError, KeyError, AttributeError, InvalidDocument)


# 408 Request Timeout and 425 Too Early are timeouts in HTTP clothing; 429 asks to come back later.
_RETRYABLE_4XX = frozenset({408, 425, 429})
# 501 Not Implemented and 505 HTTP Version Not Supported answer the same however often we ask.
_PERMANENT_5XX = frozenset({501, 505})


def classify_http_status(status: int) -> bool:
    """True if a request that got this error status is worth retrying.

    Retryable: 429, 408, 425 and every 5xx except 501 and 505. Not retryable: every other 4xx
    (the request itself is wrong: bad input, unauthorised, not found, gone...).
    """
    if not 400 <= status <= 599:
        raise ValueError(f"{status} is not an HTTP error status")
    if status >= 500:
        return status not in _PERMANENT_5XX
    return status in _RETRYABLE_4XX


def is_retryable(error: BaseException, declared: FailurePolicy | None = None) -> bool:
    if declared is not None:
        if declared.retryable and isinstance(error, declared.retryable):
            return True
        if declared.non_retryable and isinstance(error, declared.non_retryable):
            return False
    if isinstance(error, HttpStatusError):
        return classify_http_status(error.status)
    if isinstance(error, _RETRYABLE):
        return True
    if isinstance(error, _NON_RETRYABLE):
        return False
    return True  # unknown trouble gets the bounded retries, then the dead-letter queue
