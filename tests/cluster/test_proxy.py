"""The fault injector on its own: echo servers stand in for Raft nodes, this test process is node
``a`` (its pid is registered), so connections it makes are identified as coming from ``a``."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.cluster.harness import HOST, pick_ports
from tests.cluster.proxy import RaftProxy
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

QUIET_S = 0.3  # how long "no answer" is waited for


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_targets() -> Iterator[dict[str, tuple[str, int]]]:
    servers = {name: _Server((HOST, 0), _Echo) for name in ("b", "c")}
    for s in servers.values():
        threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
    yield {name: s.server_address[:2] for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


def make_proxy(
    targets: dict[str, tuple[str, int]], identify_self: bool = True
) -> tuple[RaftProxy, dict[str, int]]:
    me = os.getpid()
    proxy = RaftProxy(lambda: {me: "a"} if identify_self else {})
    ports = dict(zip(targets, pick_ports(len(targets)), strict=True))
    for name, target in targets.items():
        proxy.add(name, (HOST, ports[name]), target)
    return proxy, ports


def connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=5)
    s.settimeout(QUIET_S)
    return s


def echoes(s: socket.socket, data: bytes = b"ping") -> bool:
    """True if ``data`` comes back; False if nothing comes back within QUIET_S."""
    s.sendall(data)
    got = b""
    try:
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed by the proxy")
            got += chunk
    except TimeoutError:
        return False
    assert got == data
    return True


def closed_by_peer(s: socket.socket, timeout: float = 2.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_forwards_and_identifies_the_dialing_node(echo_targets: dict[str, tuple[str, int]]) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy, connect(ports["b"]) as s:
        assert echoes(s, b"x" * 200_000)
        links = proxy.links()
        assert [(x["src"], x["dst"]) for x in links] == [("a", "b")]
        assert links[0]["forwarded"] >= 400_000
        assert proxy.unidentified == 0


def test_blackhole_partition_of_the_dialed_node_then_heal(
    echo_targets: dict[str, tuple[str, int]],
) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy, connect(ports["b"]) as old, connect(ports["c"]) as other:
        assert echoes(old)
        assert echoes(other)
        proxy.partition("b")
        assert not echoes(old), "bytes crossed the cut on an existing connection"
        assert echoes(other), "a node outside the partition was cut off"
        with connect(ports["b"]) as new:  # accepted (a silent network), never forwarded
            assert not echoes(new)
            proxy.heal()
            # Streams that lost bytes are closed so both sides reconnect with clean framing.
            assert closed_by_peer(new)
            assert closed_by_peer(old)
        assert echoes(other), "an untouched connection was closed by heal()"
        with connect(ports["b"]) as fresh:
            assert echoes(fresh)


def test_partition_of_the_dialing_node_cuts_its_outgoing_links(
    echo_targets: dict[str, tuple[str, int]],
) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy, connect(ports["b"]) as s:
        assert echoes(s)
        proxy.partition("c")  # neither end of a->b
        assert echoes(s)
        proxy.partition("a")  # the dialer
        assert not echoes(s)
        with connect(ports["c"]) as s2:
            assert not echoes(s2)
        proxy.heal()
        with connect(ports["c"]) as s3:
            assert echoes(s3)


def test_split_groups(echo_targets: dict[str, tuple[str, int]]) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy:
        proxy.split(["a", "b"], ["c"])
        with connect(ports["b"]) as ab, connect(ports["c"]) as ac:
            assert echoes(ab)
            assert not echoes(ac)
        assert proxy.blocked("b", "c")
        assert not proxy.blocked("a", "b")


def test_reset_mode_closes_connections_across_the_cut(
    echo_targets: dict[str, tuple[str, int]],
) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy, connect(ports["b"]) as s:
        assert echoes(s)
        proxy.partition("b", mode="reset")
        assert closed_by_peer(s)
        with connect(ports["b"]) as s2:
            assert closed_by_peer(s2)
        wait_until(lambda: proxy.refused >= 1, 2, what="refused count")
        proxy.heal()
        with connect(ports["b"]) as s3:
            assert echoes(s3)


def test_unidentified_origin_is_in_the_default_group(
    echo_targets: dict[str, tuple[str, int]],
) -> None:
    proxy, ports = make_proxy(echo_targets, identify_self=False)
    with proxy, connect(ports["b"]) as s:
        assert echoes(s)
        assert proxy.links()[0]["src"] is None
        assert proxy.unidentified == 1
        proxy.partition("c")
        assert echoes(s)
        proxy.partition("b")
        assert not echoes(s)
