"""A wait the client gives up on is withdrawn at the broker (``unwait``): it used to stay open
there, with its timer, and count against the connection's cap of open waits until its own
timeout, however long that was."""

from __future__ import annotations

import asyncio
import signal

import pytest
from tq import AsyncClient, Client
from tq.broker.tcp import MAX_OPEN_WAITS
from tq.errors import WaitTimeout
from tq.protocol.messages import Ack, CancelTask, TaskInfoReply, Unwait, WaitTask

from tests.conftest import BrokerProcess, wait_until
from tests.integration.test_bad_input import RawConnection


async def _open_waits(c: AsyncClient) -> int:
    waits: int = (await c.stats())["counters"]["waits"]
    return waits


def test_cancelled_waits_are_withdrawn_and_free_the_cap(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with AsyncClient(broker.url) as c:
            tid = await c.submit("echo", 1)  # no worker: pending for ever
            waits = [
                asyncio.create_task(c.wait(tid, timeout_s=3600)) for _ in range(MAX_OPEN_WAITS)
            ]
            deadline = asyncio.get_running_loop().time() + 30
            while (n := await _open_waits(c)) < MAX_OPEN_WAITS:
                assert asyncio.get_running_loop().time() < deadline, f"{n} waits registered"
                await asyncio.sleep(0.05)
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            # The same connection can wait again at once: the cap is free (before, BAD_REQUEST
            # "at most 10000 waits open per connection" for the next hour).
            with pytest.raises(WaitTimeout):
                await c.wait(tid, timeout_s=0.01)
        async with AsyncClient(broker.url) as other:
            assert await _open_waits(other) == 0

    asyncio.run(asyncio.wait_for(go(), 90))


def test_asyncio_wait_for_timing_out_withdraws_the_wait(broker: BrokerProcess) -> None:
    async def go() -> None:
        async with AsyncClient(broker.url) as c:
            tid = await c.submit("echo", 1)
            for _ in range(3):
                try:
                    await asyncio.wait_for(c.wait(tid, timeout_s=3600), 0.05)
                except TimeoutError:
                    pass
            deadline = asyncio.get_running_loop().time() + 5
            while (n := await _open_waits(c)) != 0:
                assert asyncio.get_running_loop().time() < deadline, f"{n} waits still open"
                await asyncio.sleep(0.02)

    asyncio.run(go())


def test_a_withdrawn_wait_gets_no_answer_and_unwait_is_always_acked(
    broker: BrokerProcess,
) -> None:
    with Client(broker.url) as c:
        tid = c.submit("echo", 1)
    raw = RawConnection(broker.port)
    try:
        raw.hello()
        raw.send(WaitTask(5, tid, 3_600_000))
        assert raw.request(Unwait(6, 5)) == Ack(6)
        # Unknown, already withdrawn, answered: acknowledged all the same (the answer may cross
        # the unwait on the wire).
        assert raw.request(Unwait(7, 5)) == Ack(7)
        assert raw.request(Unwait(8, 12345)) == Ack(8)
        # The task finishes: the withdrawn wait is not answered; only the cancel is.
        reply = raw.request(CancelTask(9, tid))
        assert isinstance(reply, TaskInfoReply), reply
        assert reply.rid == 9
        raw.send(WaitTask(10, tid, 1000))  # final already: answered at once
        reply = raw.read()
        assert isinstance(reply, TaskInfoReply), reply
        assert reply.rid == 10
        assert raw.request(Unwait(11, 10)) == Ack(11)
        raw.assert_usable()
    finally:
        raw.close()
    with Client(broker.url) as c:
        wait_until(lambda: c.stats()["counters"]["waits"] == 0, what="no waits left")


def test_ctrl_c_in_the_sync_client_withdraws_its_wait(broker: BrokerProcess) -> None:
    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted  # as Ctrl-C raises KeyboardInterrupt in the main thread

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with Client(broker.url) as c:
            tid = c.submit("echo", 1)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                c.wait(tid, timeout_s=3600)
            wait_until(lambda: c.stats()["counters"]["waits"] == 0, 5, what="the wait withdrawn")
            assert c.status(tid).state == "pending"  # the client still works
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
