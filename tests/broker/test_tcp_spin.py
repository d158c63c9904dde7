"""TcpServer's poll for the next request (docs/architecture.md, "Polling before sleeping") is
skipped while the writer thread has a write running: its end comes back through
``call_soon_threadsafe``, which a poll of the sockets would not see, so the commit would wait
out the whole budget."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tq.broker.tcp import TcpServer
from tq.spin import Spinner

from tests.broker.test_local_log import Node


class CountingSpinner(Spinner):
    def __init__(self) -> None:
        super().__init__(250)
        self.asked = 0

    def spin(self) -> bool | None:
        self.asked += 1
        return True


def _server(node: Node) -> tuple[TcpServer, CountingSpinner, Any]:
    spinner = CountingSpinner()
    core = SimpleNamespace(
        log=node.log,
        closing=False,
        spinner=spinner,
        config=SimpleNamespace(max_connections=10),
    )
    return TcpServer(core), spinner, core  # type: ignore[arg-type]


def _answered(server: TcpServer) -> SimpleNamespace:
    """A connection that asked something, quick so far, whose replies just left."""
    conn = SimpleNamespace(asked=True, pace=server.spinner.pace(), _flush=lambda: None)
    server._dirty.append(conn)  # type: ignore[arg-type]
    return conn


async def test_no_poll_while_the_writer_thread_has_a_write_running(tmp_path: Path) -> None:
    node = Node(tmp_path)
    try:
        server, spinner, _core = _server(node)
        _answered(server)
        server.flush()
        server._spin()
        assert spinner.asked == 1  # idle log: polls

        node.log._running_future = Future()  # a big commit's write, on the writer thread
        _answered(server)
        server.flush()
        server._spin()
        assert spinner.asked == 1

        node.log._running_future = None
        _answered(server)
        server.flush()
        server._spin()
        assert spinner.asked == 2
    finally:
        spinner.close()
        node.close()


async def test_no_poll_for_a_peer_that_did_not_ask_or_is_slow(tmp_path: Path) -> None:
    node = Node(tmp_path)
    try:
        server, spinner, _core = _server(node)
        conn = _answered(server)
        conn.asked = False  # a watch's update, say: not an answer
        server.flush()
        assert not server._spin_scheduled
        conn = _answered(server)
        conn.pace.missed()  # this peer did not answer within the budget last time
        server.flush()
        assert not server._spin_scheduled
        _answered(server)
        server.flush()
        assert server._spin_scheduled
        await asyncio.sleep(0)  # the scheduled poll runs
        assert spinner.asked == 1
    finally:
        spinner.close()
        node.close()
