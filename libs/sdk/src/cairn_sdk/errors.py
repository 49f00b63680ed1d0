"""The failures a pipeline raises or declares, and how they are classified.

Transient trouble retries with backoff, permanent trouble goes to the dead-letter queue. A
pipeline says which is which in two ways: it raises `RetryableError` / `NonRetryableError`
(or `HttpStatusError`, classified by its status), or it declares a `FailurePolicy` naming its
own client library's exception types and its default retry policy.
"""

from dataclasses import dataclass


class RetryableError(Exception):
    """A failure that may pass if the same batch is tried again later."""


class NonRetryableError(Exception):
    """A failure that will happen again however often the batch is tried."""


class HttpStatusError(Exception):
    """An HTTP source answered with an error status; `retry_after_s` is its Retry-After in
    seconds, if any. Retryable for 408, 425, 429 and 5xx except 501/505; permanent otherwise."""

    def __init__(self, status: int, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}{': ' + message if message else ''}")
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class FailurePolicy:
    """What a pipeline declares about its failures; every part is optional.

    `retryable` / `non_retryable` are checked (in that order) before Cairn's defaults, so a
    pipeline can say that its client's `QuotaExceeded` is transient or that a `ParseError` never
    is. `max_attempts`, `base_delay_s`, `max_delay_s` (seconds) are the pipeline's default retry
    policy: a job's own `retry` fields win over them, the worker's settings fill in the rest.
    """

    retryable: tuple[type[BaseException], ...] = ()
    non_retryable: tuple[type[BaseException], ...] = ()
    max_attempts: int | None = None
    base_delay_s: float | None = None
    max_delay_s: float | None = None
