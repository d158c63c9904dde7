"""Cluster edges a reviewer reproduced: a member address that can never answer, a Raft port
another process holds, and a stop that lands while the Raft thread waits for the event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
from tq import AsyncClient, Client
from tq.broker.cluster import Closed, RaftLog, _other_peers
from tq.errors import BadRequest
from tq.protocol.messages import Ack, ClusterChange
from tq.store import StoreError

from tests.cluster.conftest import MakeCluster
from tests.cluster.harness import HOST, Cluster

pytestmark = pytest.mark.cluster


async def _change(url: str, address: str) -> None:
    async with AsyncClient(url) as c:
        await c.call(lambda rid: ClusterChange(rid, "add", address), Ack, retry=False, timeout_s=10)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:99999", "127.0.0.1:0", "bad host:7000", "127.0.0.1:7\u00b2"]
)
def test_a_member_that_could_never_answer_is_refused(
    make_cluster: MakeCluster, address: str
) -> None:
    """``cluster add 127.0.0.1:99999`` was accepted: the phantom member raised the quorum of a
    3-node cluster to 3 of 4, so losing one real node stopped it."""
    cluster = make_cluster(1)
    with pytest.raises(BadRequest):
        asyncio.run(_change(cluster.urls(), address))
    view = cluster.nodes[0].cluster()
    assert view is not None
    assert view["peers"] == {}


def test_a_taken_raft_port_stops_the_node_with_one_line(tmp_path: Path) -> None:
    """The node used to print its ready line and run without Raft, retrying the bind every
    second and logging nothing."""
    cluster = Cluster(tmp_path, 1)
    node = cluster.nodes[0]
    blocker = socket.socket()
    blocker.bind((HOST, node.raft_port))
    blocker.listen()
    try:
        node.proc.args = node.args(cluster.secret_file, cluster.extra_args)
        with pytest.raises(RuntimeError, match="broker did not become ready"):
            node.proc.start(node.client_port)
        assert node.proc.proc is not None
        assert node.proc.proc.wait(10) == 1
        err = node.proc.logs[-1].read_text().strip().splitlines()
        assert err[-1].startswith("tq: ")
        assert f"cannot bind the Raft port {node.raft_addr}" in err[-1]
    finally:
        blocker.close()
        cluster.close()


def test_the_raft_thread_stops_waiting_for_the_loop_once_the_log_closes() -> None:
    """The Raft thread restores a snapshot through the event loop. A node stopped at that
    moment joins the Raft thread from the loop, so the loop never runs the restore: both
    waited for each other until the 30 s snapshot timeout (SIGTERM right after a restart)."""
    raft = RaftLog.__new__(RaftLog)
    raft._loop = asyncio.new_event_loop()  # never runs: the loop is busy stopping
    raft._closed = False
    raft._snapshot_timeout = 30.0
    outcome: list[BaseException | object] = []

    def raft_thread() -> None:
        try:
            outcome.append(raft._run_in_loop(lambda: "restored"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=raft_thread)
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    raft._closed = True  # what ClusterLog.close does before destroy_synchronous
    thread.join(5)
    try:
        assert not thread.is_alive()
        assert time.monotonic() - t0 < 1.0
        assert isinstance(outcome[0], Closed)
    finally:
        raft._loop.close()


def test_the_raft_files_are_owner_only(make_cluster: MakeCluster) -> None:
    """They hold task payloads, like the single node's journal (0600); they were 0644."""
    cluster = make_cluster(1)
    with cluster.nodes[0].client() as c:
        c.submit("echo", {"secret": "payload"})
    data = cluster.nodes[0].proc.data_dir
    files = [p for p in data.rglob("raft*") if p.is_file()]
    assert files
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def test_a_long_wait_follows_the_new_leader(make_cluster: MakeCluster) -> None:
    """The client's window for redirects and reconnects (here max(1, 5) = 5 s) was counted
    from the start of the call, so a wait already older than that failed at the first
    failover instead of following the new leader."""
    cluster = make_cluster(3)
    with Client(cluster.urls()) as c:
        tid = c.submit("echo", {})
    result: list[object] = []

    def waiter() -> None:
        try:
            with Client(cluster.urls(), connect_timeout_s=1.0) as c:
                result.append(c.wait(tid, timeout_s=60).state)
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(6.5)  # longer than the window: the wait is parked at the leader all along
    cluster.kill(cluster.wait_leader())
    cluster.wait_leader()
    with Client(cluster.urls()) as c:
        c.cancel(tid)
    thread.join(30)
    assert result == ["cancelled"]


def test_a_cluster_of_one_commits_without_waiting_for_the_tick(make_cluster: MakeCluster) -> None:
    """Nothing from a peer wakes the Raft thread of a lone member, so each entry waited for
    the 50 ms tick: a sequential submit took 52 ms (0.8 ms now). Not a speed target: the
    median must simply be well under one tick."""
    cluster = make_cluster(1)
    with Client(cluster.urls()) as c:
        c.submit("echo", {})
        took = []
        for i in range(40):
            t0 = time.perf_counter()
            c.submit("echo", {"i": i})
            took.append(time.perf_counter() - t0)
    took.sort()
    assert took[len(took) // 2] < 0.025, took


def test_a_peer_list_naming_this_node_by_another_name_is_cleaned() -> None:
    """``localhost:PORT`` beside ``127.0.0.1:PORT`` made a node count itself as a member it
    could never reach."""
    peers = [
        "localhost:7000",
        "127.0.0.1:7001",
        "localhost:7001",
        "127.0.0.1:7000",
        "10.9.8.7:7000",
    ]
    assert _other_peers("127.0.0.1:7000", peers) == ["127.0.0.1:7001", "10.9.8.7:7000"]


def test_importing_the_cluster_module_leaves_inet_ntop_working() -> None:
    """pysyncobj swaps socket.inet_ntop for a Windows-only function on every platform; in a
    process that imported it, psutil's connection listing (the test proxy's) raised TypeError."""
    import tq.broker.cluster  # noqa: F401

    assert socket.inet_ntop(socket.AF_INET, b"\x7f\x00\x00\x01") == "127.0.0.1"
    assert socket.inet_ntop(socket.AF_INET6, b"\x00" * 15 + b"\x01") == "::1"


def test_a_store_error_while_applying_stops_the_node_instead_of_skipping_the_entry() -> None:
    """Disk full on one node: the entry's apply failed, and the node marked it applied anyway
    (an ApplyFailed result), its store now behind the others' for good."""

    class FullDisk:
        def apply(self, index: int, entry: bytes) -> object:
            raise StoreError("store write failed: IO error: No space left on device")

    raft = RaftLog.__new__(RaftLog)
    raft.sm = FullDisk()  # type: ignore[assignment]
    raft._applied = 4
    raft.fatal = None
    raft._pending = set()
    stopped: list[BaseException] = []
    raft._on_fatal_cb = stopped.append
    raft.apply_errors = raft.skipped_entries = raft.applied_entries = 0
    raft._apply(5, b"entry")
    assert raft._applied == 4  # not applied: restarted, the node applies it from the log
    assert [type(e) for e in stopped] == [StoreError]
    raft._apply(6, b"next")  # nothing after it is applied either
    assert raft._applied == 4
    assert len(stopped) == 1
