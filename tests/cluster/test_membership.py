"""Membership changes under load: a fourth node joins (``tq cluster add``) and an old one leaves
(``tq cluster remove``) while a client submits. The client sees nothing but the redirects its
``AsyncClient`` retries by itself, and every acknowledged task is there at the end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.conftest import MakeCluster
from tests.cluster.harness import Node, Writer, list_all, tq_cli
from tests.cluster.history import History
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster


def cli_ok(*args: str) -> str:
    proc = tq_cli(*args)
    assert proc.returncode == 0, f"tq {' '.join(args)}: rc {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def test_add_a_node_and_remove_one_while_submitting(
    make_cluster: MakeCluster, record_file: Path, history: History
) -> None:
    cluster = make_cluster(3)
    leader = cluster.wait_leader()
    old_members = list(cluster.nodes)
    writer = Writer(
        cluster.urls(), history, record_file, total=1_000_000, batch=20, lanes=4, give_up_s=30
    ).start()
    writer.wait_acked(1000, timeout=30)

    # Join: the leader appends the new configuration, then the node starts knowing everyone.
    new = cluster.new_node(peers=[n.raft_addr for n in old_members])
    history.note(f"cluster add {new.name} {new.raft_addr}")
    out = cli_ok("cluster", "add", new.raft_addr, "--broker", cluster.urls(old_members))
    assert new.raft_addr in out
    cluster.start([new])

    def new_node_caught_up() -> bool:
        lv = leader.cluster() or {}
        nv = new.cluster() or {}
        peer = (lv.get("peers") or {}).get(new.raft_addr) or {}
        return bool(
            peer.get("connected")
            and nv.get("role") == "follower"
            and nv.get("applied_index", 0) >= (lv.get("applied_index") or 1) - 50
        )

    wait_until(new_node_caught_up, 30, interval=0.1, what=f"{new.name} joined and caught up")
    history.note(f"{new.name} caught up")
    writer.wait_acked(history.acked_count + 1000, timeout=30)

    # Leave: a follower of the old three goes; the cluster is then n?,n?,n4.
    leader = cluster.wait_leader()
    gone = next(n for n in old_members if n is not leader)
    history.note(f"cluster remove {gone.name} {gone.raft_addr}")
    out = cli_ok("cluster", "remove", gone.raft_addr, "--broker", cluster.urls())
    assert gone.raft_addr in out
    remaining: list[Node] = [n for n in cluster.nodes if n is not gone]

    def removed_everywhere() -> bool:
        for n in remaining:
            v = n.cluster() or {}
            peers = v.get("peers") or {}
            if gone.raft_addr in peers or len(peers) != len(remaining) - 1:
                return False
        return True

    wait_until(removed_everywhere, 15, interval=0.1, what=f"{gone.name} out of every config")
    cluster.kill(gone)
    history.note(f"killed removed {gone.name}")
    writer.wait_acked(history.acked_count + 1000, timeout=30)
    time.sleep(0.5)
    writer.stop()

    # The client saw no error (redirects were followed inside the AsyncClient).
    assert writer.errors == [], writer.error_summary()
    assert not writer.gave_up
    leader = cluster.wait_leader(among=remaining)
    rc, status = cluster.status_cli(remaining)
    assert rc == 0, status
    assert sorted(n["node_id"] for n in status["nodes"]) == sorted(n.name for n in remaining)
    assert [n["role"] for n in status["nodes"]].count("leader") == 1
    lview = leader.cluster()
    assert lview is not None
    assert set(lview["peers"]) == {n.raft_addr for n in remaining if n is not leader}

    state = cluster.wait_converged(timeout=30, nodes=remaining)
    listed = list_all(cluster.urls(remaining))
    present = [tid for ids in listed.values() for tid in ids]
    history.assert_ok(present)
    assert sum(state["states"].values()) == len(present) == history.acked_count
    print(
        f"\nmembership: {history.acked_count} acked, {writer.requests} requests, "
        f"leader {leader.name}, members {[n.name for n in remaining]}"
    )
