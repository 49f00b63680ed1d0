"""Webhook deliveries against the real store and a real local HTTP server: the outbox is filled
once per finished job, each attempt is signed, recorded and retried with backoff."""

import asyncio
import json
import logging
import time

import httpx
import pytest

from cairn_contracts.states import JobState
from cairn_contracts.store import JOBS, WEBHOOK_DELIVERIES, JobRecord
from cairn_contracts.webhooks import SIGNATURE_HEADER, check_callback_url, verify
from cairn_scheduler.webhooks import WebhookDeliverer, WebhookPolicy
from cairn_testkit.webhook_receiver import WebhookReceiver

SECRET = "whsec-test"
SPEC = {"pipeline": "synthetic", "params": {"count": 4}}


@pytest.fixture
async def http_client():
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        yield client


def deliverer(db, client, **policy) -> WebhookDeliverer:
    options = {"secret": SECRET, "timeout_s": 5, "max_attempts": 3, "base_delay_s": 1, "max_delay_s": 1, "allow_private_networks": True}
    return WebhookDeliverer(db, client, WebhookPolicy(**{**options, **policy}))


async def finished_job(db, url: str | None, state: JobState = JobState.SUCCESS) -> str:
    record = JobRecord.new({**SPEC, "callback_url": url} if url else SPEC, "acme")
    document = record.to_document()
    document.update(state=str(state), result={"records_done": 4}, finished_at_ms=int(time.time() * 1000))
    await db[JOBS].insert_one(document)
    return record.id


async def test_a_delivery_answered_500_is_retried_and_recorded_then_delivered_signed(db, http_client) -> None:
    with WebhookReceiver([500, 200]) as receiver:
        job_id = await finished_job(db, receiver.url)
        running = await finished_job(db, receiver.url, JobState.STARTED)
        loop = deliverer(db, http_client)
        now = int(time.time() * 1000)

        assert await loop.run_pass(now) == 1
        delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
        assert (delivery["state"], delivery["attempt_count"], delivery["attempts"][0]["status_code"]) == ("pending", 1, 500)
        assert now < delivery["next_attempt_at_ms"] <= int(time.time() * 1000) + 1000  # backoff: base 1 s
        assert await loop.run_pass(now) == 0  # not due yet

        assert await loop.run_pass(delivery["next_attempt_at_ms"]) == 1

        delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
        assert (delivery["state"], [a["status_code"] for a in delivery["attempts"]]) == ("delivered", [500, 200])
        assert [r.status for r in receiver.received] == [500, 200]
        for request in receiver.received:
            assert verify(SECRET, request.body, request.headers[SIGNATURE_HEADER], time.time())
            assert not verify("another secret", request.body, request.headers[SIGNATURE_HEADER], time.time())
        assert receiver.received[0].body == receiver.received[1].body  # the same event each attempt
        event = json.loads(receiver.received[1].body)
        assert (event["type"], event["data"]["job_id"], event["data"]["state"], event["data"]["result"]) == (
            "job.finished", job_id, "SUCCESS", {"records_done": 4})
        assert await db[WEBHOOK_DELIVERIES].count_documents({"_id": running}) == 0  # not finished: no webhook


async def test_logs_name_a_callback_by_scheme_and_host_only(db, http_client, caplog) -> None:
    # The receiver's token in the path and query must not reach the logs.
    url = "http://127.0.0.1:9/hooks/tok3n-p?key=tok3n-q"
    job_id = await finished_job(db, url)
    with caplog.at_level(logging.DEBUG):
        await deliverer(db, http_client).run_pass(int(time.time() * 1000))
    delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
    assert delivery["attempt_count"] == 1  # attempted (connection refused) and logged
    said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("cairn_"))
    assert "queued for http://127.0.0.1:9" in said and "attempt 1 failed" in said
    assert "tok3n" not in said


async def test_the_outbox_holds_one_delivery_per_job_whatever_runs_it(db, http_client) -> None:
    job_id = await finished_job(db, "http://127.0.0.1:9/hooks")
    without = await finished_job(db, None)
    loops = [deliverer(db, http_client, secret=None) for _ in range(3)]

    await asyncio.gather(*(loop.enqueue_finished(int(time.time() * 1000)) for loop in loops))
    await db[JOBS].update_one({"_id": job_id}, {"$set": {"webhook_queued": False}})  # as if the mark was lost in a crash
    await loops[0].enqueue_finished(int(time.time() * 1000))

    assert await db[WEBHOOK_DELIVERIES].count_documents({"job_id": job_id}) == 1
    assert await db[WEBHOOK_DELIVERIES].count_documents({"job_id": without}) == 0
    assert (await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id}))["attempt_count"] == 0  # no secret: nothing sent


async def test_attempts_are_given_up_after_max_attempts(db, http_client) -> None:
    with WebhookReceiver([503]) as receiver:
        job_id = await finished_job(db, receiver.url, JobState.FAILURE)
        loop = deliverer(db, http_client, max_attempts=2)
        await loop.run_pass(int(time.time() * 1000))
        await loop.run_pass(int(time.time() * 1000) + 5_000)
        await loop.run_pass(int(time.time() * 1000) + 10_000)

    delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
    assert (delivery["state"], delivery["attempt_count"], len(receiver.received)) == ("failed", 2, 2)


async def test_a_private_address_is_refused_unless_allowed(db, http_client) -> None:
    with WebhookReceiver([200]) as receiver:
        job_id = await finished_job(db, receiver.url)
        await deliverer(db, http_client, allow_private_networks=False).run_pass(int(time.time() * 1000))

    delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
    assert delivery["state"] == "failed" and "not a public address" in delivery["attempts"][0]["error"]
    assert receiver.received == []


async def test_two_schedulers_send_a_due_attempt_once(db, http_client) -> None:
    with WebhookReceiver([200]) as receiver:
        job_id = await finished_job(db, receiver.url)
        loops = [deliverer(db, http_client) for _ in range(2)]
        await loops[0].enqueue_finished(int(time.time() * 1000))
        now = int(time.time() * 1000)
        await asyncio.gather(*(loop.deliver_due(now) for loop in loops * 2))

    assert len(receiver.received) == 1
    assert (await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id}))["state"] == "delivered"


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "gopher://x", "http://user:pw@example.com/", "http:///nohost", "https://example.com:99999/", "http://exa mple.com/"],
)
def test_a_callback_url_other_than_plain_http_is_refused(url) -> None:
    with pytest.raises(ValueError):
        check_callback_url(url)


async def test_a_receiver_dripping_an_endless_answer_is_cut_at_the_attempt_timeout(db, http_client) -> None:
    """httpx's timeout is per read: a receiver sending a byte every half second would hold the
    attempt (and the whole delivery pass, and the scheduler's memory) for as long as it likes."""
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
        try:
            while True:  # headers that never end: no status is ever complete
                writer.write(b"X-Drip: x\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (ConnectionError, OSError):
            pass

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        job_id = await finished_job(db, f"http://127.0.0.1:{port}/hook")
        started = time.monotonic()
        await asyncio.wait_for(deliverer(db, http_client, timeout_s=1).run_pass(int(time.time() * 1000)), timeout=30)
        assert time.monotonic() - started < 10
    finally:
        server.close()
    delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
    assert delivery["state"] == "pending" and delivery["attempt_count"] == 1, delivery["attempts"]
    assert "Timeout" in delivery["attempts"][0]["error"]


# The last four are not globally reachable (IANA) yet `is_global` on Python 3.11.7: IPv4-translated
# (SIIT) ::ffff:0:a.b.c.d, local-use NAT64 64:ff9b:1::/48, deprecated site-local, multicast.
@pytest.mark.parametrize(
    "host",
    [
        "[::ffff:127.0.0.1]", "[64:ff9b::7f00:1]", "[::127.0.0.1]", "[2002:7f00:1::1]", "2130706433", "0x7f000001", "[::1]",
        "[::ffff:0:a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "[fec0::1]", "224.0.0.1",
    ],
)
async def test_addresses_embedding_a_private_ipv4_are_refused(host) -> None:
    from cairn_scheduler.webhooks import RefusedUrl, check_host

    with pytest.raises(RefusedUrl):
        await check_host(f"http://{host}:8080/hook", allow_private=False)


async def test_the_guard_resolves_the_very_host_httpx_connects_to(monkeypatch) -> None:
    """httpx posts to `faß.de` under its IDNA 2008 name `xn--fa-hia.de`; Python's resolver, given
    the Unicode name, asks for the IDNA 2003 one, `fass.de` (an attacker's public host)."""
    from cairn_scheduler.webhooks import RefusedUrl, check_host

    answers = {"fass.de": "93.184.216.34", "xn--fa-hia.de": "169.254.169.254"}

    def resolve(host, *args, **kwargs):  # as the system resolver would answer
        return [(2, 1, 6, "", (answers[host if host.isascii() else host.encode("idna").decode()], 0))]

    monkeypatch.setattr("socket.getaddrinfo", resolve)
    with pytest.raises(RefusedUrl, match="169.254.169.254"):
        await check_host("http://faß.de/hook", allow_private=False)


@pytest.mark.parametrize("header", ["t=²,v1=ab", "t=" + "9" * 5000 + ",v1=ab", "t=-1,v1=ab", "t=,v1=", "garbage"])
def test_verify_refuses_a_hostile_signature_header_without_raising(header) -> None:
    """A receiver calls `verify` on whatever arrived: it answers False, never raises."""
    assert verify(SECRET, b"{}", header, time.time()) is False


@pytest.mark.parametrize(
    ("url", "allow_private"),
    [("http://a..b/hook", False), ("http://\u200b.com/hook", False), ("http://" + "a" * 70 + ".com/", False), ("http://xn--zz.com/hook", True)],
)
async def test_a_callback_host_no_resolver_accepts_fails_its_delivery_instead_of_the_pass(db, http_client, url, allow_private) -> None:
    """Hosts the URL check lets through but IDNA refuses (empty or over-long labels, bad
    A-labels, invisible characters) raise UnicodeError/InvalidURL: recorded as a refused URL
    (failed), never an exception out of the pass, which would leave the delivery to be claimed
    again forever and stop the pass's other work."""
    job_id = await finished_job(db, url)
    await deliverer(db, http_client, allow_private_networks=allow_private).run_pass(int(time.time() * 1000))
    delivery = await db[WEBHOOK_DELIVERIES].find_one({"_id": job_id})
    assert (delivery["state"], delivery["attempt_count"]) == ("failed", 1), delivery
    assert "invalid" in delivery["attempts"][0]["error"].lower()
