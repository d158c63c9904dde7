"""Polling before sleeping (tq/spin.py, docs/architecture.md "Polling before sleeping"): a real
broker polls for a sequential client's next request, ``--spin-us 0`` never does, and a client
asked to poll does so for its replies. What it saves is measured by ``tq bench``, not here."""

from __future__ import annotations

import asyncio

import pytest
from tq import AsyncClient
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


def test_spin_us_0_never_polls(broker_factory: object) -> None:
    broker = broker_factory("--spin-us", "0")  # type: ignore[operator]
    counters, _ = asyncio.run(_submit_in_turn(broker.url))
    assert "spins" not in counters


def test_a_client_asked_to_poll_finds_its_replies(broker: BrokerProcess) -> None:
    _, client_hits = asyncio.run(_submit_in_turn(broker.url, spin_us=20_000))
    assert client_hits > 0


@pytest.mark.parametrize("bad", [-1, 100_001, 1.5, True, "250"])
def test_a_bad_client_spin_is_refused(bad: object) -> None:
    with pytest.raises(BadRequest, match="spin_us must be a whole number of µs"):
        AsyncClient("tcp://127.0.0.1:1", spin_us=bad)  # type: ignore[arg-type]
