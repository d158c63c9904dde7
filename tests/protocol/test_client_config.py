"""How a client picks its connect timeout: the argument, else ``TQ_CONNECT_TIMEOUT``, else 10 s."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from tests.cli.test_cli import free_port
from tests.conftest import subprocess_env
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


@pytest.mark.parametrize("url", ["tcp://ops:hunter2@127.0.0.1:7700", "ops:hunter2@127.0.0.1:7700"])
def test_a_password_in_the_address_is_refused_without_being_repeated(url: str) -> None:
    with pytest.raises(ValueError, match="no user or password") as caught:
        AsyncClient(url)
    assert "hunter2" not in str(caught.value)


def test_the_cli_refuses_it_in_one_line_without_the_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tq", "stats", "--broker", "tcp://ops:hunter2@127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=subprocess_env(),
        check=False,
    )
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
