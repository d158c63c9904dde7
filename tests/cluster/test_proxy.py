"""The fault injector on its own: echo servers stand in for Raft nodes, this test process is node
``a`` (its pid is registered), so connections it makes are identified as coming from ``a``."""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import psutil
import pytest

from tests.cluster.harness import HOST, pick_ports
from tests.cluster.proxy import RaftProxy
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster

QUIET_S = 0.3  # how long "no answer" is waited for
ANSWER_S = 5.0  # how long an answer may take (identification, the dial, a loaded machine)


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


def echoes(s: socket.socket, data: bytes = b"ping", timeout: float = ANSWER_S) -> bool:
    """True if ``data`` comes back; False if nothing comes back within ``timeout``."""
    s.settimeout(timeout)
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


def silent(s: socket.socket) -> bool:
    """Nothing comes back within QUIET_S (a cut link)."""
    return not echoes(s, timeout=QUIET_S)


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
        assert silent(old), "bytes crossed the cut on an existing connection"
        assert echoes(other), "a node outside the partition was cut off"
        with connect(ports["b"]) as new:  # accepted (a silent network), never forwarded
            assert silent(new)
            # heal() before the proxy has taken this connection in would forward it instead
            wait_until(
                lambda: sum(x["dst"] == "b" and x["tainted"] for x in proxy.links()) == 2,
                ANSWER_S,
                what="both links to b cut",
            )
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
        assert silent(s)
        with connect(ports["c"]) as s2:
            assert silent(s2)
        proxy.heal()
        with connect(ports["c"]) as s3:
            assert echoes(s3)


def test_split_groups(echo_targets: dict[str, tuple[str, int]]) -> None:
    proxy, ports = make_proxy(echo_targets)
    with proxy:
        proxy.split(["a", "b"], ["c"])
        with connect(ports["b"]) as ab, connect(ports["c"]) as ac:
            assert echoes(ab)
            assert silent(ac)
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
        assert silent(s)


def open_sockets(*, local: Iterable[int] = (), remote: Iterable[int] = ()) -> list[Any]:
    """This process's TCP sockets (connected or connecting) on a ``local`` port or to a
    ``remote`` one."""
    local, remote = set(local), set(remote)
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.laddr and c.raddr and (c.laddr.port in local or c.raddr.port in remote)
    ]


@pytest.fixture
def stalled_target() -> Iterator[tuple[tuple[str, int], set[int]]]:
    """An address whose connects hang (a listener that never accepts, its backlog full: the
    kernel then drops further SYNs), like a node too busy or dying when a peer redials it; and
    the local ports of the sockets that fill it."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    addr = listener.getsockname()[:2]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(addr)
        fillers.append(s)
    yield addr, {s.getsockname()[1] for s in fillers}
    for s in [*fillers, listener]:
        s.close()


def test_close_while_a_link_is_being_set_up_leaks_no_socket(
    stalled_target: tuple[tuple[str, int], set[int]],
) -> None:
    """Regression (a CI run failed on the ResourceWarning of a leaked proxy transport): at a
    cluster's teardown the survivors redial dead nodes through the proxy, and the proxy was closed
    while such a connection was still being set up (identified, then its upstream dialed). That
    accept outlived the proxy's loop with its sockets open, until GC. Closing now cancels
    unfinished accepts and closes every socket the proxy made or accepted."""
    target, fillers = stalled_target
    proxy = RaftProxy()
    port = pick_ports(1)[0]
    proxy.add("b", (HOST, port), target)
    with socket.create_connection((HOST, port), timeout=5):
        wait_until(lambda: any("accept" in what for _, what in proxy.events), 5, what="the accept")
        assert len(open_sockets(remote=[target[1]])) == len(fillers) + 1  # the upstream dial
        proxy.close()
        leaked = [
            c for c in open_sockets(local=[port], remote=[target[1]]) if c.laddr.port not in fillers
        ]
    assert leaked == [], f"sockets left open by the closed proxy: {leaked}"
