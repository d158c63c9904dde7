"""How a client picks its connect timeout: the argument, else ``TQ_CONNECT_TIMEOUT``, else 10 s."""

from __future__ import annotations

import asyncio
import time

import pytest
from tests.cli.test_cli import free_port
from tq.client.aio import AsyncClient
from tq.errors import BrokerUnavailable


def test_the_environment_sets_the_default_and_the_argument_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TQ_CONNECT_TIMEOUT", raising=False)
    assert AsyncClient("tcp://127.0.0.1:1").connect_timeout_s == 10.0
    monkeypatch.setenv("TQ_CONNECT_TIMEOUT", "0.5")
    assert AsyncClient("tcp://127.0.0.1:1").connect_timeout_s == 0.5
    assert AsyncClient("tcp://127.0.0.1:1", connect_timeout_s=3).connect_timeout_s == 3


@pytest.mark.parametrize("raw", ["soon", "nan", "-1", "1e9"])
def test_a_bad_value_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("TQ_CONNECT_TIMEOUT", raw)
    with pytest.raises(ValueError, match="TQ_CONNECT_TIMEOUT"):
        AsyncClient("tcp://127.0.0.1:1")


async def test_an_unreachable_broker_fails_within_the_environment_s_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TQ_CONNECT_TIMEOUT", "0.3")
    client = AsyncClient(f"tcp://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(client.connect(), 5)
    assert time.monotonic() - t0 < 3
