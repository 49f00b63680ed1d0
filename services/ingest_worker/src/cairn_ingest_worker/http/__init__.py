"""The HTTP plumbing of the `http_json` pipeline: the shared per-host rate limit, the page fetcher
(timeouts, retries honouring Retry-After) and the raw-page store (GridFS)."""
