"""Which failures are worth retrying.

Transient trouble (network, timeouts, an unavailable store) retries with backoff; bad input and
programming errors in a pipeline's declared non-retryable set go straight to the dead-letter queue.
A pipeline raises `RetryableError` or `NonRetryableError` to decide for itself.
"""

from pymongo.errors import AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError


class RetryableError(Exception):
    """A failure that may pass if the same batch is tried again later."""


class NonRetryableError(Exception):
    """A failure that will happen again however often the batch is tried."""


class LeaseLost(Exception):
    """Another worker holds this shard now (our lease expired); stop without writing."""


_RETRYABLE = (RetryableError, ConnectionError, TimeoutError, AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError)
_NON_RETRYABLE = (NonRetryableError, ValueError, TypeError, KeyError, AttributeError)


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, _RETRYABLE):
        return True
    if isinstance(error, _NON_RETRYABLE):
        return False
    return True  # unknown trouble gets the bounded retries, then the dead-letter queue
