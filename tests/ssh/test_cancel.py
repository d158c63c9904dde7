"""A command the shell is running ends with its session: a `wait` left behind by a client that
disconnected used to run to its timeout, holding one of the shell's four threads, and a broker
stopped meanwhile could not exit until it had."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import wait_until
from tests.ssh.conftest import Keys, SshBroker, connect


def _open_waits(ssh: SshBroker) -> int:
    with ssh.broker.client() as c:
        waits: int = c.stats()["counters"]["waits"]
        return waits


async def _start_wait(ssh: SshBroker, conn: object, task_id: str, interactive: bool) -> object:
    command = f"wait {task_id} --timeout 50"
    if interactive:
        process = await conn.create_process(term_type="xterm")  # type: ignore[attr-defined]
        process.stdin.write(command + "\n")
    else:
        process = await conn.create_process(command)  # type: ignore[attr-defined]
    await asyncio.to_thread(wait_until, lambda: _open_waits(ssh) == 1, 10, what="the wait open")
    return process


@pytest.mark.parametrize("interactive", [False, True], ids=["exec", "pty"])
async def test_closing_the_session_cancels_its_running_command(
    ssh_broker: SshBroker, keys: Keys, interactive: bool
) -> None:
    with ssh_broker.broker.client() as c:
        task_id = c.submit("echo", 1)  # no worker: it stays pending
    async with connect(ssh_broker.port, keys.admin) as conn:
        await _start_wait(ssh_broker, conn, task_id, interactive)
    t0 = time.monotonic()
    await asyncio.to_thread(wait_until, lambda: _open_waits(ssh_broker) == 0, 10, what="no wait")
    assert time.monotonic() - t0 < 5
    assert ssh_broker.log_events("ssh.command_cancelled")
    # The shell still runs commands (the thread came back).
    async with connect(ssh_broker.port, keys.admin) as conn:
        result = await conn.run("stats -o json", check=False)
        assert result.exit_status == 0, result.stderr


async def test_a_broker_stopped_during_a_command_exits_at_once(
    ssh_broker: SshBroker, keys: Keys
) -> None:
    with ssh_broker.broker.client() as c:
        task_id = c.submit("echo", 1)
    async with connect(ssh_broker.port, keys.admin) as conn:
        await _start_wait(ssh_broker, conn, task_id, interactive=False)
        t0 = time.monotonic()
        code = await asyncio.to_thread(ssh_broker.broker.terminate)
        elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 10, f"the broker took {elapsed:.1f} s to stop"
    assert ssh_broker.log_events("ssh.command_cancelled")
