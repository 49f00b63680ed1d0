"""Scenario 5: the broker path for commands, against the broker's own limit, in the same run.

Cairn path: StartJob commands published with Cairn's own publisher (`cairn_runtime.amqp.Publisher`:
persistent, mandatory, publisher confirm awaited) to `cairn.commands`, routed to the durable
priority queue `cairn.scheduler.commands`, consumed with aio-pika and acked one by one (manual
ack, prefetch as the scheduler sets it). Measured with 1 publish in flight (one caller awaiting
each confirm, as one gateway request does) and with `--broker-in-flight` concurrent publishers
(as concurrent gateway requests do).

Broker limit: a minimal pair on the same broker and vhost, same body: a channel without
confirms publishing transient messages to a plain queue, a consumer with auto-ack.

The clock runs from the first publish until the consumer has seen every message. Nothing else
of Cairn runs during this scenario (no scheduler consumes the commands queue).
"""

import argparse
import asyncio
import logging
import time
import uuid
from typing import Any

import aio_pika

from bench.scenarios.ingest import _ints
from bench.stats import fmt_summary, summary
from bench.system import BenchContext
from cairn_contracts.jobs import JobSpec
from cairn_contracts.messages import StartJob
from cairn_contracts.topology import QUEUE_SCHEDULER_COMMANDS
from cairn_runtime.amqp import Publisher, declare_topology

logger = logging.getLogger(__name__)

NAME = "broker"
PREFETCH = 8  # the scheduler's default CAIRN_PREFETCH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker (scenario 5)")
    group.add_argument("--messages", type=int, default=5000, help="messages per measurement (default 5,000)")
    group.add_argument("--broker-in-flight", type=_ints, default=[1, 64], help="concurrent confirmed publishes (default 1,64)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {f"cairn_{n}": [] for n in args.broker_in_flight}
    runs["broker_limit"] = []
    for rep in range(args.repeats):
        for in_flight in args.broker_in_flight:
            ctx.settle()
            meter = ctx.cpu_meter().start()
            figures = asyncio.run(cairn_path(ctx.amqp_url, args.messages, in_flight))
            figures["cpu"] = meter.stop()
            runs[f"cairn_{in_flight}"].append(figures)
            logger.info("broker: cairn path, %d in flight, run %d: %.0f msg/s", in_flight, rep + 1, figures["messages_per_s"])
        ctx.settle()
        meter = ctx.cpu_meter().start()
        figures = asyncio.run(minimal_pair(ctx.amqp_url, args.messages * 4))
        figures["cpu"] = meter.stop()
        runs["broker_limit"].append(figures)
        logger.info("broker: minimal pair, run %d: %.0f msg/s", rep + 1, figures["messages_per_s"])
    body_size = len(_command().model_dump_json())
    return {
        "params": {"messages": args.messages, "limit_messages": args.messages * 4, "body_bytes": body_size, "prefetch": PREFETCH, "repeats": args.repeats},
        "paths": {
            name: {
                "messages_per_s": summary([r["messages_per_s"] for r in rs]),
                "publish_per_s": summary([r["publish_per_s"] for r in rs]),
                "runs": rs,
            }
            for name, rs in runs.items()
        },
    }


def _command() -> StartJob:
    spec = JobSpec.model_validate({"name": "bench broker", "pipeline": "synthetic", "params": {"count": 10}})
    return StartJob(job_id=uuid.uuid4().hex, tenant="default", spec=spec)


async def cairn_path(amqp_url: str, messages: int, in_flight: int) -> dict[str, Any]:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queues = await declare_topology(channel)
        queue = queues[QUEUE_SCHEDULER_COMMANDS]
        await queue.purge()
        publisher = await Publisher.open(connection, timeout_s=30)
        command = _command()
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            StartJob.model_validate_json(message.body)  # as the scheduler's consumer decodes it
            await message.ack()
            received += 1
            if received >= messages:
                done.set()

        tag = await queue.consume(on_message)
        remaining = messages

        async def one_publisher() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await publisher.publish(command, priority=2, correlation_id=command.job_id)

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_publisher() for _ in range(in_flight))), timeout=300)
        published = time.perf_counter()
        await asyncio.wait_for(done.wait(), timeout=120)
        finished = time.perf_counter()
        await queue.cancel(tag)
        await publisher.close()
    finally:
        await connection.close()
    return {
        "messages": messages,
        "in_flight": in_flight,
        "seconds": round(finished - started, 3),
        "messages_per_s": messages / (finished - started),
        "publish_per_s": messages / (published - started),
    }


async def minimal_pair(amqp_url: str, messages: int) -> dict[str, Any]:
    body = _command().model_dump_json().encode()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        publish_channel = await connection.channel(publisher_confirms=False)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=0)
        queue = await consume_channel.declare_queue(f"bench.broker-limit.{uuid.uuid4().hex[:6]}", auto_delete=True, exclusive=True)
        received = 0
        done = asyncio.Event()

        def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            received += 1
            if received >= messages:
                done.set()

        tag = await queue.consume(on_message, no_ack=True)  # type: ignore[arg-type]
        exchange = publish_channel.default_exchange
        started = time.perf_counter()
        for _ in range(messages):
            await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT), queue.name)
        published = time.perf_counter()
        await asyncio.wait_for(done.wait(), timeout=120)
        finished = time.perf_counter()
        await queue.cancel(tag)
    finally:
        await connection.close()
    return {
        "messages": messages,
        "seconds": round(finished - started, 3),
        "messages_per_s": messages / (finished - started),
        "publish_per_s": messages / (published - started),
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["path", "messages/s end to end", "publishes/s", "of the broker's limit"]
    limit = result["paths"]["broker_limit"]["messages_per_s"]["median"]
    rows = []
    for name, path in result["paths"].items():
        label = "minimal pair: broker limit (no confirm, transient, auto-ack)" if name == "broker_limit" else (
            f"Cairn: confirm + persistent + manual ack, {name.split('_')[1]} in flight"
        )
        share = path["messages_per_s"]["median"] / limit * 100 if limit else 0
        rows.append([label, fmt_summary(path["messages_per_s"]), fmt_summary(path["publish_per_s"]), f"{share:.0f}%"])
    return headers, rows


def headline(result: dict[str, Any]) -> dict[str, Any]:
    paths = result["paths"]
    return {name: p["messages_per_s"]["median"] for name, p in paths.items()}
