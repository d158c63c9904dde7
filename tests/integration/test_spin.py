"""Polling before sleeping (tq/spin.py, docs/architecture.md "Polling before sleeping"): a real
broker polls for a sequential client's next request, not for slow ones, ``--spin-us 0`` never
does, one sharing its loop with its client backs off, and a client asked to poll does so for its
replies. What it saves is measured by ``tq bench``, not here."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
from tq import AsyncClient, Client
from tq.broker.app import BrokerApp
from tq.config import BrokerConfig
from tq.errors import BadRequest

from tests.conftest import BrokerProcess

N = 300


async def _submit_in_turn(url: str, spin_us: int = 0) -> tuple[dict[str, int], int]:
    """N submits one after another; the broker's counters, and the client's poll hits."""
    async with AsyncClient(url, spin_us=spin_us) as c:
        for k in range(N):
            await c.submit("echo", {"k": k})
        conn = await c.connect()
        hits = conn._spinner.hits
        stats = await c.stats()
        assert stats["states"]["pending"] == N
        return stats["counters"], hits


def test_a_sequential_client_finds_the_broker_polling(broker: BrokerProcess) -> None:
    counters, client_hits = asyncio.run(_submit_in_turn(broker.url))
    assert counters["spins"] > 0
    # The client answers each reply within ~0.1 ms here, well inside the 250 µs default; on a
    # loaded machine some polls run out, but not every one of 300.
    assert counters["spin_hits"] > 0
    assert client_hits == 0  # the client polls only when asked


def test_spin_us_0_never_polls(broker_factory: Callable[..., BrokerProcess]) -> None:
    broker = broker_factory("--spin-us", "0")
    counters, _ = asyncio.run(_submit_in_turn(broker.url))
    assert "spins" not in counters


def test_a_client_asked_to_poll_finds_its_replies(broker: BrokerProcess) -> None:
    _, client_hits = asyncio.run(_submit_in_turn(broker.url, spin_us=20_000))
    assert client_hits > 0


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
