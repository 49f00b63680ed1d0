"""run_every: the one periodic loop of the asyncio services."""

import asyncio
import logging

import pytest

from cairn_runtime.service import run_every


async def run_until(loop: asyncio.Task, done: asyncio.Event) -> None:
    try:
        async with asyncio.timeout(5):
            await done.wait()
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_a_failed_pass_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("the store blinked")
        if len(calls) == 3:
            done.set()

    with caplog.at_level(logging.ERROR, logger="cairn_runtime.service"):
        await run_until(asyncio.create_task(run_every(0.01, flaky, what="flaky pass")), done)

    assert len(calls) >= 3
    failures = [r for r in caplog.records if r.getMessage() == "flaky pass failed"]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_a_returned_float_is_the_next_wait_anything_else_the_interval() -> None:
    """The due-retry dispatcher returns the seconds until the next due retry; a pass returning
    a count or a bool (a schedule tick, a gauge pass) waits the interval."""
    times: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def paced() -> object:
        times.append(loop.time())
        if len(times) == 3:
            done.set()
        return [0.0, True, None][len(times) - 1]

    await run_until(asyncio.create_task(run_every(0.3, paced, what="paced pass")), done)

    assert times[1] - times[0] < 0.2  # 0.0 returned: called again at once
    assert times[2] - times[1] >= 0.29  # True is not a delay: the interval
