"""The `broker` fixture: Cairn's topology declared in this run's vhost, every queue empty before
and after the test, with a confirmed publisher. Loaded for every suite by the root conftest.py."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from cairn_runtime.amqp import Publisher, connect, declare_topology
from cairn_testkit.fixtures import TestEnvironment


@dataclass
class Broker:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    queues: dict[str, AbstractQueue]
    publisher: Publisher


@pytest.fixture
async def broker(test_env: TestEnvironment, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    connection = await connect(test_env.amqp_url, f"cairn-tests:{request.node.name}")
    try:
        channel = await connection.channel()
        queues = await declare_topology(channel)
        for queue in queues.values():
            await queue.purge()
        publisher = await Publisher.open(connection, timeout_s=5.0)
        yield Broker(connection, channel, queues, publisher)
        cleanup = await connection.channel()
        for name in queues:
            await (await cleanup.get_queue(name)).purge()
    finally:
        await connection.close()
