"""Polling before sleeping (tq/spin.py, docs/architecture.md "Polling before sleeping"): a real
broker polls for a sequential client's next request, not for slow ones, ``--spin-us 0`` never
does, one sharing its loop with its client backs off, and a client asked to poll does so for its
replies. What it saves is measured by ``tq bench``, not here."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import AsyncClient, Client, spin
from tq.broker.app import BrokerApp
from tq.client.connection import Connection
from tq.config import BrokerConfig
from tq.errors import BadRequest, WaitTimeout
from tq.protocol.messages import ClaimTask, Leased
from tq.spin import CLIENT_SPIN_US, MAX_CLIENT_SPIN_US

from tests.conftest import BrokerProcess

N = 300


async def _submit_in_turn(
    url: str, spin_us: int | None = None, pause_s: float = 0.0, n: int = N
) -> tuple[dict[str, int], Connection]:
    """N submits one after another (``pause_s`` apart); the broker's counters and the client's
    connection (its ``poll``'s counters). ``spin_us`` None: the client's default."""
    async with AsyncClient(url, **({} if spin_us is None else {"spin_us": spin_us})) as c:
        for k in range(n):
            await c.submit("echo", {"k": k})
            if pause_s:
                await asyncio.sleep(pause_s)
        conn = await c.connect()
        stats = await c.stats()
        assert stats["states"]["pending"] == n
        return stats["counters"], conn


def test_a_sequential_client_finds_the_broker_polling(broker: BrokerProcess) -> None:
    counters, conn = asyncio.run(_submit_in_turn(broker.url, spin_us=0))
    assert counters["spins"] > 0
    # The client answers each reply within ~0.1 ms here, well inside the 250 µs default; on a
    # loaded machine some polls run out, but not every one of 300.
    assert counters["spin_hits"] > 0
    assert conn.poll.spins == 0  # spin_us=0: the client never polls


def test_spin_us_0_never_polls(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--spin-us", "0")
    counters, _ = asyncio.run(_submit_in_turn(broker.url))
    assert "spins" not in counters


def test_a_client_polls_for_its_replies_by_default(broker: BrokerProcess) -> None:
    assert AsyncClient(broker.url).spin_us == CLIENT_SPIN_US
    _, conn = asyncio.run(_submit_in_turn(broker.url))
    # A reply over the budget (a loaded machine) leaves the next requests unpolled until one
    # comes within it again, so how many are polled for depends on the machine; some are, and
    # some find their reply.
    assert conn.poll.spins > 0
    assert conn.poll.spins - conn.poll.misses > 0


def test_a_client_that_pauses_between_requests_does_not_poll(broker: BrokerProcess) -> None:
    # 5 ms between submits, five times the budget: the broker and the disk have gone idle too,
    # and polling would cost CPU for next to nothing. (The first submit follows the hello's
    # answer at once, so it may be polled for.)
    _, conn = asyncio.run(_submit_in_turn(broker.url, spin_us=1000, pause_s=0.005))
    assert conn.poll.spins <= 1


def test_parked_requests_are_not_polled_for(broker: BrokerProcess) -> None:
    """A ``wait`` and a claim with ``wait_ms`` wait at the broker for as long as they like:
    polling for them would only burn the budget."""

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(broker.url, spin_us=MAX_CLIENT_SPIN_US) as c:
            tid = await c.submit("echo", {}, queue="parked")
            conn = await c.connect()
            before = conn.poll.spins
            with pytest.raises(WaitTimeout):
                await c.wait(tid, timeout_s=0.2)  # no worker: it stays pending
            after_wait = conn.poll.spins
        async with AsyncClient(broker.url, role="worker", spin_us=MAX_CLIENT_SPIN_US) as w:
            await w.stats()
            conn = await w.connect()
            before_claim = conn.poll.spins
            leased = await w.call(lambda rid: ClaimTask(rid, ["empty"], 1, 200), Leased)
            assert leased.tasks == []
            return after_wait - before, conn.poll.spins - before_claim, conn.poll.misses

    waited, claimed, misses = asyncio.run(run())
    assert (waited, claimed, misses) == (0, 0, 0)


def test_a_client_with_other_requests_in_flight_does_not_poll(broker: BrokerProcess) -> None:
    """Polling is for a caller waiting for each reply in turn. Bursts of submits (their replies
    keep coming without a wake-up each), and submits made in turn while a ``wait`` is parked on
    the same connection, do not keep the loop awake."""

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(broker.url, spin_us=MAX_CLIENT_SPIN_US) as c:
            parked = await c.submit("echo", {}, queue="parked")
            conn = await c.connect()
            spins, rounds = conn.poll.spins, conn.poll.rounds
            for _ in range(3):
                await asyncio.gather(*(c.submit("echo", {"k": k}) for k in range(50)))
            # Each burst's first submit leaves at once, alone, and may start a poll; the next
            # pass of the loop finds the other 49 in flight and ends it.
            burst_rounds = conn.poll.rounds - rounds
            waiting = asyncio.ensure_future(c.wait(parked, timeout_s=5))
            await asyncio.sleep(0)  # one pass: the wait's task runs up to its request, sent
            assert conn._pending  # the wait is in flight
            spins_beside_wait = conn.poll.spins
            for k in range(20):
                await c.submit("echo", {"k": k})
            spins_beside_wait = conn.poll.spins - spins_beside_wait
            waiting.cancel()
            return conn.poll.spins - spins, burst_rounds, spins_beside_wait

    burst_spins, burst_rounds, spins_beside_wait = asyncio.run(run())
    assert burst_rounds <= burst_spins + 3, (burst_spins, burst_rounds)
    assert spins_beside_wait == 0


def test_an_interrupt_inside_a_poll_leaves_polling_on(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands in the poll's yield, caught by an application that runs its own
    loop and goes on: the connection polls again afterwards."""
    loop = asyncio.new_event_loop()
    c = AsyncClient(broker.url, spin_us=MAX_CLIENT_SPIN_US)

    async def submits(n: int) -> None:
        for k in range(n):
            await c.submit("echo", {"k": k})

    def interrupted() -> None:
        raise KeyboardInterrupt

    try:
        loop.run_until_complete(submits(3))
        conn = c._conn
        assert conn is not None
        monkeypatch.setattr(os, "sched_yield", interrupted)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(submits(1))
        monkeypatch.undo()
        loop.run_until_complete(asyncio.sleep(0.2))  # the interrupted submit's reply comes
        before = conn.poll.spins
        loop.run_until_complete(submits(20))
        assert conn.poll.spins > before
    finally:
        loop.run_until_complete(c.close())
        loop.close()


def test_polling_never_holds_up_the_loops_other_work(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reply is polled for, timers and other tasks on the client's loop run on time:
    the poll is the loop itself kept from sleeping, not a call that blocks it. The broker is
    stopped (SIGSTOP) so that the poll runs its whole 100 ms; yields are made to count as
    uncontended, or a loaded machine's other tasks would end the poll first."""
    monkeypatch.setattr(spin, "_switches", lambda: 0)
    monkeypatch.setattr(spin, "CONTENDED_NS", 10**12)
    assert broker.proc is not None
    pid = broker.proc.pid

    async def run() -> tuple[float, bool]:
        async with AsyncClient(broker.url, spin_us=MAX_CLIENT_SPIN_US) as c:
            await c.submit("echo", {})
            conn = await c.connect()
            os.kill(pid, signal.SIGSTOP)
            try:
                submit = asyncio.ensure_future(c.submit("echo", {}))
                await asyncio.sleep(0)  # the request is sent and the poll begins
                polling = conn.poll.scheduled
                t0 = time.monotonic()
                for _ in range(10):
                    await asyncio.sleep(0.001)
                took = time.monotonic() - t0
                polling = polling and conn.poll.scheduled  # still within its 100 ms
            finally:
                os.kill(pid, signal.SIGCONT)
            await submit
            return took, polling

    took, polling = asyncio.run(run())
    assert polling
    # Ten 1 ms sleeps: ~10-20 ms. A poll that blocked the loop would hold them all up until its
    # 100 ms budget ran out.
    assert took < 0.08, took


def test_a_client_stops_polling_when_its_cpu_is_wanted(broker: BrokerProcess) -> None:
    """With another task wanting the client's CPU, the poll ends: with more pollers than CPUs
    it would take the CPU from the work that answers them. A busy process is pinned to the CPU
    the client's thread is pinned to, so every yield hands it a time slice."""
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread, which runs the client's loop
        _, conn = asyncio.run(_submit_in_turn(broker.url, spin_us=MAX_CLIENT_SPIN_US, n=50))
    finally:
        os.sched_setaffinity(0, mask)
        hog.kill()
        hog.wait()
    assert conn.poll.spins > 0
    assert conn.poll.yields > 0
    assert conn.poll.misses == 0  # none ran its 100 ms out beside the hog


def test_a_client_stops_polling_when_most_yields_hand_the_cpu_over(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Yields that each hand the CPU over briefly (the broker's own loop polling on the client's
    CPU) end the poll too, after two. Every yield is made to count as a switch, and to take no
    time, so that only this rule can end the polls before their replies come."""
    switches = itertools.count()
    monkeypatch.setattr(spin, "_switches", lambda: next(switches))
    monkeypatch.setattr(os, "sched_yield", lambda: None)
    _, conn = asyncio.run(_submit_in_turn(broker.url, spin_us=MAX_CLIENT_SPIN_US, n=50))
    assert conn.poll.spins > 0
    # Each poll ends at its second pass (a reply that landed between the two ends it first).
    assert conn.poll.rounds <= 2 * conn.poll.spins
    assert conn.poll.yields >= conn.poll.spins - 2


def test_cli_commands_do_not_poll(broker: BrokerProcess) -> None:
    """A command makes a request or a few, and the SSH shell runs commands inside the broker's
    process, where a poll would compete for the GIL with the thread that must answer."""
    from tq.cli.main import _run_client

    async def spin_us(client: AsyncClient) -> int:
        await client.stats()
        return client.spin_us

    assert _run_client(spin_us, broker.url) == 0


@pytest.mark.parametrize("bad", [-1, 100_001, 1.5, True, "250"])
def test_a_bad_client_spin_is_refused(bad: object) -> None:
    with pytest.raises(BadRequest, match="spin_us must be a whole number of µs"):
        AsyncClient("tcp://127.0.0.1:1", spin_us=bad)  # type: ignore[arg-type]


async def _paced_clients(url: str, clients: int, pause_s: float, seconds: float) -> int:
    """``clients`` connections, each submitting and then pausing ``pause_s``; submits made."""
    done = 0

    async def one() -> None:
        nonlocal done
        async with AsyncClient(url) as c:
            end = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < end:
                await c.submit("echo", {"k": done})
                done += 1
                await asyncio.sleep(pause_s)

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


def test_many_slow_clients_do_not_make_the_broker_poll(broker: BrokerProcess) -> None:
    """Sixteen clients pausing 3 ms after each reply send, together, often enough that a single
    pace for the whole broker found them quick, and polled after nearly every commit (a review
    measured ~40% more CPU per submit, and worse latency). Each peer is judged by its own pace:
    none answers within 250 µs, so polls stay a handful per connection."""
    submits = asyncio.run(_paced_clients(broker.url, 16, 0.003, 1.5))
    assert submits > 400
    with Client(broker.url) as c:
        counters = c.stats()["counters"]
    assert counters.get("spins", 0) < 80, (counters, submits)


def test_a_broker_sharing_its_loop_with_its_client_stops_polling(tmp_path: Path) -> None:
    """In one event loop, a poll holds the very loop that would send the next request: it can
    never find one. BrokerConfig leaves polling off (``tq broker`` turns it on); asked to poll
    anyway, the broker backs off after polls that missed, to a few of them in all."""

    async def run() -> tuple[int, int]:
        app = BrokerApp(BrokerConfig(port=0, data_dir=str(tmp_path / "d"), spin_us=250))
        port = await app.start()
        try:
            async with AsyncClient(f"tcp://127.0.0.1:{port}") as c:
                for k in range(600):
                    await c.submit("echo", {"k": k})
            return app.core.spinner.spins, app.core.spinner.hits
        finally:
            await app.stop()

    assert BrokerConfig().spin_us == 0
    threshold = gc.get_threshold()
    try:
        spins, hits = asyncio.run(run())
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert hits == 0
    assert spins < 40  # without the back-off: one poll in two commits, ~300
