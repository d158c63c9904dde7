"""Requests sent on one connection are answered in the order their effects happen: a read sent
right after a write sees it. A ``submit(x)`` and a ``status(x)`` (or ``wait(x)``, ``list``) in
one write answered TASK_NOT_FOUND: the submit waited in the tick's queue while the read ran at
once, and in a cluster a write is applied only once a majority has it."""

from __future__ import annotations

import asyncio

from tq import AsyncClient
from tq.errors import WaitTimeout

from tests.conftest import BrokerProcess


async def reads_see_the_write_before_them(url: str) -> None:
    async with AsyncClient(url) as c:
        for i in range(5):
            _, info = await asyncio.gather(c.submit("echo", i, task_id=f"s{i}"), c.status(f"s{i}"))
            assert (info.id, info.state) == (f"s{i}", "pending")
            # no worker: the wait must time out, not find no task
            waited = await asyncio.gather(
                c.submit("echo", i, task_id=f"w{i}"),
                c.wait(f"w{i}", timeout_s=0.05),
                return_exceptions=True,
            )
            assert isinstance(waited[1], WaitTimeout), waited[1]
            _, (page, _cursor) = await asyncio.gather(
                c.submit("echo", i, task_id=f"l{i}"), c.list_page("pending", limit=1000)
            )
            assert f"l{i}" in {t.id for t in page}
            _, cancelled = await asyncio.gather(c.cancel(f"s{i}"), c.status(f"s{i}"))
            assert cancelled.state == "cancelled"


def test_a_read_sent_after_a_write_sees_it(broker: BrokerProcess) -> None:
    asyncio.run(reads_see_the_write_before_them(broker.url))


def test_a_wait_sent_behind_a_write_can_be_withdrawn(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with AsyncClient(broker.url) as c:
            submit = asyncio.ensure_future(c.submit("echo", 1, task_id="x"))
            wait = asyncio.ensure_future(c.wait("x", timeout_s=3600))
            await asyncio.sleep(0)  # both sent in one write: the wait starts after the submit
            wait.cancel()
            await submit
            await asyncio.gather(wait, return_exceptions=True)
            for _ in range(100):
                if (await c.stats())["counters"]["waits"] == 0:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the withdrawn wait is still open at the broker")

    asyncio.run(go())
