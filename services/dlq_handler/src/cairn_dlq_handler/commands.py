"""The DLQ handler's second duty, wired: replay/discard commands, shard events, periodic settling."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from pymongo.asynchronous.database import AsyncDatabase

from cairn_contracts.messages import DeadLetterCommand, ShardFinished
from cairn_contracts.topology import QUEUE_DLQ_COMMANDS, QUEUE_DLQ_EVENTS
from cairn_dlq_handler.status_cache import RedisStatusCache
from cairn_runtime.celery_config import ShardTaskSender
from cairn_dlq_handler.replay import DeadLetterCommands
from cairn_dlq_handler.settings import DlqSettings
from cairn_runtime.amqp import Publisher
from cairn_runtime.consumer import ContractConsumer

logger = logging.getLogger(__name__)


@dataclass
class Replays:
    commands: DeadLetterCommands
    settler: asyncio.Task
    cache: RedisStatusCache

    async def stop(self) -> None:
        self.settler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.settler
        await self.cache.close()


async def start_replays(
    settings: DlqSettings, db: AsyncDatabase, connection: AbstractRobustConnection, queues: dict[str, AbstractQueue]
) -> Replays:
    cache = RedisStatusCache(aioredis.Redis.from_url(settings.redis_url), settings.redis_prefix)
    commands = DeadLetterCommands(db, ShardTaskSender.for_broker(settings.amqp_url, "cairn-dlq-handler"), cache)
    publisher = await Publisher.open(connection, settings.publish_timeout_s)
    common = {"service": settings.service_name, "publisher": publisher}
    await ContractConsumer(queue=queues[QUEUE_DLQ_COMMANDS], model=DeadLetterCommand, handler=commands.handle, **common).start()
    await ContractConsumer(queue=queues[QUEUE_DLQ_EVENTS], model=ShardFinished, handler=commands.shard_finished, **common).start()
    settler = asyncio.create_task(_settle_forever(commands, settings.settle_interval_s))
    logger.info("dlq handler consuming %s and %s", QUEUE_DLQ_COMMANDS, QUEUE_DLQ_EVENTS)
    return Replays(commands, settler, cache)


async def _settle_forever(commands: DeadLetterCommands, interval_s: float) -> None:
    """The safety net under the shard events: settle every replay whose shard has finished."""
    while True:
        try:
            settled = await commands.settle_all()
            if settled:
                logger.info("settled %d replays", settled)
        except Exception:
            logger.exception("settling replays failed")
        await asyncio.sleep(interval_s)
