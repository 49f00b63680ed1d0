"""Webhook deliveries: a finished job that names `callback_url` gets a signed POST, retried with
backoff, every attempt recorded; nothing here ever blocks or changes the job.

Two steps per pass (`CAIRN_WEBHOOK_POLL_S`), both polling MongoDB, so this module knows nothing of
how jobs finish (the roll-up):

1. Outbox fill. Finished jobs (SUCCESS, FAILURE, CANCELLED) with a callback URL and no
   `webhook_queued` mark get a `webhook_deliveries` document whose `_id` is the job id (a second
   insert is a DuplicateKeyError: idempotent, whichever scheduler or crash), then the mark.
   The body is built and frozen there, so every attempt sends the same bytes.
2. Delivery. A pending delivery whose `next_attempt_at_ms` has passed is claimed with one
   conditional update on `{_id, state: pending, attempt_count, next_attempt_at_ms}` as read that
   pushes `next_attempt_at_ms` past the attempt's timeout (a lease: a scheduler that dies
   mid-POST leaves it to be retried once that passes: at-least-once). The attempt's outcome is one
   conditional update on `{_id, state: pending, attempt_count}`: the whole `attempts` list
   (docs/mongodb-stand-in.md: no `$push` of documents), `attempt_count + 1`, and `delivered`,
   `failed` (attempts exhausted, or the endpoint answered 410 Gone, or the URL is refused) or the
   next attempt after the backoff `min(max_delay, base * 2^(n-1))`, jittered to [50 %, 100 %].

Any 2xx is delivered; anything else (other status, timeout, connection error) is retried. An
attempt lasts at most `timeout_s` in all (httpx bounds each read only) and reads 300 bytes of the answer.
Redirects are not followed (a redirect to an internal address would bypass the SSRF guard).

SSRF guard: before each attempt the host is resolved and refused (`failed`, not retried) if any
address is not globally routable (`cairn_runtime.egress`, shared with the http_json pipeline),
unless `CAIRN_WEBHOOK_ALLOW_PRIVATE_NETWORKS` is set. The HTTP client resolves again when it
connects, so DNS rebinding can slip past this check: in production send deliveries through an
egress proxy (`CAIRN_WEBHOOK_PROXY`) that enforces the same rule, or firewall the scheduler's egress.

A job reopened by a DLQ replay after its webhook was queued is not notified again.
"""

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cairn_contracts import clock
from cairn_contracts.states import TERMINAL_JOB_STATES, state_values
from cairn_contracts.store import JOBS, WEBHOOK_DELIVERIES
from cairn_contracts.webhooks import ATTEMPT_HEADER, DELIVERY_HEADER, EVENT_JOB_FINISHED, SIGNATURE_HEADER, signature
from cairn_runtime import egress

logger = logging.getLogger(__name__)

BATCH = 50
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
RESPONSE_EXCERPT = 300


@dataclass(frozen=True)
class WebhookPolicy:
    """`secret` None: nothing is sent (deliveries stay pending). Times in seconds."""

    secret: str | None
    timeout_s: float = 10.0
    max_attempts: int = 10
    base_delay_s: float = 10.0
    max_delay_s: float = 3600.0
    allow_private_networks: bool = False

    def backoff_s(self, attempt: int) -> float:
        """Delay after failed attempt number `attempt` (1-based): full ceiling
        min(max_delay_s, base_delay_s * 2^(attempt-1)), jittered to [50 %, 100 %] of it so that
        deliveries failed together do not retry together."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** min(attempt - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)


class RefusedUrl(Exception):
    """The callback host resolves to an address Cairn may not call (SSRF guard)."""


def job_finished_body(job: dict[str, Any], now_ms: int) -> str:
    """The JSON body of a job's `job.finished` event (compact, keys sorted): frozen at enqueue."""
    event = {
        "id": job["_id"],
        "type": EVENT_JOB_FINISHED,
        "created_at": clock.from_ms(now_ms).isoformat(),
        "data": {
            "job_id": job["_id"],
            "tenant": job["tenant"],
            "name": job.get("name"),
            "pipeline": job.get("pipeline"),
            "state": job["state"],
            "schedule_id": job.get("schedule_id"),
            "finished_at": _iso(job.get("finished_at")),
            "result": job.get("result"),
            "url": f"/v1/jobs/{job['_id']}",
        },
    }
    return json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)


def _iso(value: Any) -> str | None:
    ms = clock.stored_ms(value)
    return clock.from_ms(ms).isoformat() if ms is not None else None


async def check_host(url: str, allow_private: bool) -> None:
    """Raise `RefusedUrl` if the URL's host resolves to a non-global address (unless allowed);
    `OSError` if it cannot be resolved (retried: DNS may come back); `httpx.InvalidURL` if httpx
    cannot parse it (the delivery fails for good)."""
    if allow_private:
        return
    try:
        # The host as httpx parses and connects to it (ASCII, IDNA 2008): urlsplit's Unicode
        # hostname would be resolved under its IDNA 2003 name, another host for some (faß.de).
        host = httpx.URL(url).raw_host.decode("ascii")
        await egress.check_host_async(host, "CAIRN_WEBHOOK_ALLOW_PRIVATE_NETWORKS")
    except egress.RefusedHost as refused:
        raise RefusedUrl(str(refused)) from None


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a callback URL: what a log line may say of it. The path, query
    and user info often carry the receiver's secret token, and logs are read more widely."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(an invalid URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


@dataclass(frozen=True)
class WebhookDeliverer:
    db: AsyncDatabase
    client: httpx.AsyncClient
    policy: WebhookPolicy

    async def run_pass(self, now_ms: int | None = None) -> int:
        """Fill the outbox, then send every due delivery; returns how many attempts were made."""
        now_ms = now_ms if now_ms is not None else clock.now_ms()
        queued = await self.enqueue_finished(now_ms)
        if self.policy.secret is None:
            if queued:  # said once per delivery queued, not every pass
                logger.warning("%d webhook deliveries queued; none is sent until CAIRN_WEBHOOK_SECRET is set", queued)
            return 0
        return await self.deliver_due(now_ms)

    async def enqueue_finished(self, now_ms: int) -> int:
        """Create the delivery of each finished job with a callback not queued yet; returns how
        many this call created."""
        query = {
            "webhook_queued": {"$in": [False, None]},
            "state": {"$in": state_values(TERMINAL_JOB_STATES)},
            "spec.callback_url": {"$type": "string"},
        }
        created = 0
        async for job in self.db[JOBS].find(query).limit(BATCH):
            url = (job.get("spec") or {}).get("callback_url")
            if not isinstance(url, str):
                continue
            document = {
                "_id": job["_id"],
                "job_id": job["_id"],
                "tenant": job["tenant"],
                "event": EVENT_JOB_FINISHED,
                "job_state": job["state"],
                "url": url,
                "body": job_finished_body(job, now_ms),
                "state": PENDING,
                "attempt_count": 0,
                "attempts": [],
                "next_attempt_at_ms": now_ms,
                "created_at_ms": now_ms,
            }
            try:
                await self.db[WEBHOOK_DELIVERIES].insert_one(document)
                created += 1
                logger.info("webhook of job %s (%s) queued for %s", job["_id"], job["state"], origin_of(url))
            except DuplicateKeyError:
                pass  # queued before (another scheduler, or a crash before the mark below)
            await self.db[JOBS].update_one({"_id": job["_id"], "webhook_queued": {"$in": [False, None]}}, {"$set": {"webhook_queued": True}})
        return created

    async def deliver_due(self, now_ms: int) -> int:
        due = {"state": PENDING, "next_attempt_at_ms": {"$lte": now_ms}}
        claimed = []
        async for delivery in self.db[WEBHOOK_DELIVERIES].find(due).sort("next_attempt_at_ms", 1).limit(BATCH):
            lease_ms = now_ms + int(self.policy.timeout_s * 1000) * 2 + 5_000
            won = await self.db[WEBHOOK_DELIVERIES].find_one_and_update(
                {
                    "_id": delivery["_id"],
                    "state": PENDING,
                    "attempt_count": delivery["attempt_count"],
                    "next_attempt_at_ms": delivery["next_attempt_at_ms"],
                },
                {"$set": {"next_attempt_at_ms": lease_ms}},
                return_document=ReturnDocument.AFTER,
            )
            if won is not None:
                claimed.append(won)
        await asyncio.gather(*(self.attempt(delivery) for delivery in claimed))
        return len(claimed)

    async def attempt(self, delivery: dict[str, Any]) -> str:
        """POST the delivery once and record the outcome; returns the delivery's new state."""
        number = int(delivery["attempt_count"]) + 1
        body = str(delivery["body"]).encode()
        started = time.monotonic()
        record: dict[str, Any] = {"attempt": number, "at_ms": clock.now_ms()}
        final = False
        try:
            await check_host(delivery["url"], self.policy.allow_private_networks)
            assert self.policy.secret is not None
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "cairn-webhooks/1",
                DELIVERY_HEADER: str(delivery["_id"]),
                ATTEMPT_HEADER: str(number),
                SIGNATURE_HEADER: signature(self.policy.secret, body, int(time.time())),
            }
            # httpx's timeout bounds each read, not the exchange: a receiver dripping an endless
            # answer would hold this attempt (and the pass) forever. The whole attempt is bounded,
            # and only the excerpt kept is read.
            async with asyncio.timeout(self.policy.timeout_s):
                async with self.client.stream(
                    "POST", delivery["url"], content=body, headers=headers, timeout=self.policy.timeout_s
                ) as response:
                    excerpt = b""
                    async for chunk in response.aiter_bytes():
                        excerpt += chunk
                        if len(excerpt) >= RESPONSE_EXCERPT:
                            break
            record["status_code"] = response.status_code
            record["response"] = excerpt[:RESPONSE_EXCERPT].decode(response.encoding or "utf-8", errors="replace")
            ok = response.is_success
            final = response.status_code == 410  # the receiver says the endpoint is gone for good
        except RefusedUrl as error:
            record["error"] = str(error)
            ok, final = False, True
        except (ValueError, httpx.InvalidURL) as error:
            # A host IDNA refuses (empty or over-long label, bad A-label): it never will resolve.
            record["error"] = f"invalid callback URL: {type(error).__name__}: {error}"[:500]
            ok, final = False, True
        except (httpx.HTTPError, OSError) as error:
            record["error"] = f"{type(error).__name__}: {error}"[:500]
            ok = False
        record["duration_ms"] = int((time.monotonic() - started) * 1000)
        now_ms = clock.now_ms()
        fields: dict[str, Any] = {"attempt_count": number, "attempts": [*_documents(delivery.get("attempts")), record], "last_attempt_at_ms": now_ms}
        if ok:
            fields.update(state=DELIVERED, delivered_at_ms=now_ms, next_attempt_at_ms=None)
        elif final or number >= self.policy.max_attempts:
            fields.update(state=FAILED, failed_at_ms=now_ms, next_attempt_at_ms=None)
        else:
            fields.update(next_attempt_at_ms=now_ms + int(self.policy.backoff_s(number) * 1000))
        stored = await self.db[WEBHOOK_DELIVERIES].update_one(
            {"_id": delivery["_id"], "state": PENDING, "attempt_count": number - 1}, {"$set": fields}
        )
        state = fields.get("state", PENDING)
        if not stored.modified_count:
            logger.warning("webhook of job %s: attempt %d not recorded (another scheduler recorded it first)", delivery["_id"], number)
        elif ok:
            logger.info("webhook of job %s delivered (attempt %d)", delivery["_id"], number)
        else:
            logger.warning("webhook of job %s: attempt %d failed (%s); %s", delivery["_id"], number,
                           record.get("error") or record.get("status_code"), "given up" if state == FAILED else "retried")
        return str(state)


def _documents(items: Any) -> list[dict[str, Any]]:
    return [item for item in items or [] if isinstance(item, dict)]
