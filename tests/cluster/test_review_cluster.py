"""Cluster bugs a reviewer reproduced: a new leader that served reads before it had applied what
the old one committed, a member restarted with other ``--peers`` than its data belongs to, and a
member with another ``--raft-secret-file`` that failed without a word."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tq.broker.cluster as cluster_module
from pysyncobj.node import TCPNode
from tq import AsyncClient
from tq.broker.cluster import (
    MEMBERS_FILE,
    ClusterLog,
    Committed,
    DurableJournal,
    MembersMismatch,
    RaftNotLeader,
    check_members,
)
from tq.errors import NotLeader
from tq.model import new_ids
from tq.protocol.messages import Ack, Nack, QueryStatus, SubmitTask, TaskInfoReply

from tests.cluster.conftest import MakeCluster
from tests.cluster.harness import HOST, Cluster, Node, tq_cli
from tests.conftest import tail, wait_until

pytestmark = pytest.mark.cluster


# --- 1. a new leader serves once it has applied an entry of its own term ------------------------


class _Raft:
    """What ClusterLog asks of its RaftLog, with proposals the test resolves by hand."""

    def __init__(self) -> None:
        self.leading = False
        self.fatal: BaseException | None = None
        self._closed = False
        self.proposals: list[asyncio.Future[Committed]] = []

    def is_leader(self) -> bool:
        return self.leading

    def leader(self) -> str | None:
        return "127.0.0.1:7001" if self.leading else None

    def propose(self, entry: bytes, timeout: float | None = None) -> asyncio.Future[Committed]:
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self.proposals.append(fut)
        return fut


def test_a_new_leader_serves_only_once_an_entry_of_its_term_is_applied(tmp_path: Path) -> None:
    """Elected, a node knows every committed entry but applies the last ones only when an entry
    of its own term commits: it answered status from the state before them, and a task the old
    leader had acknowledged read as TASK_NOT_FOUND. It now refuses (NOT_LEADER naming no one:
    naming itself sent clients straight back) until its Announce is applied here."""

    async def go() -> None:
        roles: list[str] = []
        sm: Any = SimpleNamespace(nodes={"127.0.0.1:7001": "tcp://127.0.0.1:7000"}, settings=None)
        log = ClusterLog(
            None,  # type: ignore[arg-type]
            sm,
            lambda exc: None,
            lambda result: None,
            node_id="n1",
            raft_address="127.0.0.1:7001",
            peers=["127.0.0.1:7002", "127.0.0.1:7003"],
            client_address="tcp://127.0.0.1:7000",
            data_dir=str(tmp_path),
            password=None,
            on_role_change=roles.append,
        )
        raft = _Raft()
        log.raft = raft  # type: ignore[assignment]
        log._loop = asyncio.get_running_loop()

        raft.leading = True
        log._role_changed("leader")
        assert not log.is_leader, "serving before an entry of its term was applied"
        assert roles == [], "the core was told to lead (timers armed) before it caught up"
        refused: list[Any] = []
        log.append(0, [], refused.append)
        assert isinstance(refused[0], NotLeader)
        assert log.not_leader().leader is None  # never itself: clients would loop on it
        assert len(raft.proposals) == 1  # the Announce of this term

        raft.proposals[0].set_result(Committed(7, None))
        await asyncio.sleep(0)
        assert log.is_leader
        assert roles == ["leader"]

        # Stepping down stops serving at once; the next election waits for its own Announce,
        # retried (not given up) when it fails while this node still leads.
        raft.leading = False
        log._role_changed("follower")
        assert not log.is_leader
        raft.leading = True
        log._role_changed("leader")
        assert not log.is_leader
        raft.proposals[1].set_exception(RaftNotLeader("full", reason="QUEUE_FULL"))
        await asyncio.sleep(0.2)
        assert not log.is_leader
        assert len(raft.proposals) == 3, "the failed Announce was not proposed again"
        # the late success of an earlier term's Announce changes nothing
        log._role_changed("follower")
        log._role_changed("leader")
        raft.proposals[2].set_result(Committed(9, None))
        await asyncio.sleep(0)
        assert not log.is_leader
        raft.proposals[3].set_result(Committed(10, None))
        await asyncio.sleep(0)
        assert log.is_leader
        assert roles == ["leader", "follower", "follower", "leader"]

    asyncio.run(go())


async def _read_until_known(url: str, tid: str, until: float, done: asyncio.Event) -> str:
    """Ask exactly this node for ``tid`` until it answers with the task or TASK_NOT_FOUND (or
    another node did: ``done``)."""
    while time.monotonic() < until and not done.is_set():
        client = AsyncClient(url, timeout_s=2.0, connect_timeout_s=0.3)
        try:
            conn = await client.connect()
            while time.monotonic() < until and not done.is_set():
                rid = conn.next_rid()
                reply = await conn.send(rid, QueryStatus(rid, tid), 2.0)
                if isinstance(reply, TaskInfoReply):
                    done.set()
                    return "found"
                if isinstance(reply, Nack) and reply.code == "TASK_NOT_FOUND":
                    done.set()
                    return f"TASK_NOT_FOUND from {url}: {reply.message}"
                await asyncio.sleep(0.005)  # NOT_LEADER: a follower, or not caught up yet
        except Exception:
            await asyncio.sleep(0.01)
        finally:
            await client.close()
    return "no answer" if not done.is_set() else "another node answered"


def test_an_acknowledged_task_is_found_right_after_the_leader_dies(
    make_cluster: MakeCluster,
) -> None:
    """The reviewer's repro: kill -9 the leader as soon as it acknowledged a submit and ask both
    survivors for the task. Before the fix, 30-50% of the trials got TASK_NOT_FOUND from the
    new leader; a client given every address must find the task without an error."""
    cluster = make_cluster(3)
    for _trial in range(2):
        leader = cluster.wait_leader()
        survivors = [n for n in cluster.nodes if n is not leader]
        tid = new_ids.new()

        async def trial(
            leader: Node = leader, survivors: list[Node] = survivors, tid: str = tid
        ) -> list[str]:
            client = AsyncClient(leader.url, timeout_s=5.0)
            try:
                conn = await client.connect()
                rid = conn.next_rid()
                spec = AsyncClient.make_spec("echo", {"x": 1}, task_id=tid)
                reply = await conn.send(rid, SubmitTask(rid, spec), 5.0)
                assert isinstance(reply, Ack), reply
                cluster.kill(leader)  # at once: the followers may not know it is committed
            finally:
                await client.close()
            until, done = time.monotonic() + 8.0, asyncio.Event()
            answers = await asyncio.gather(
                *(_read_until_known(n.url, tid, until, done) for n in survivors)
            )
            async with AsyncClient(cluster.urls(survivors), timeout_s=5.0) as c:
                info = await c.status(tid)
            assert info.id == tid
            return list(answers)

        answers = asyncio.run(trial())
        assert "found" in answers, answers
        assert not any(a.startswith("TASK_NOT_FOUND") for a in answers), answers
        cluster.start([leader])


# --- 2. the member set is recorded; a start with other --peers is refused ----------------------


def _membership_entry(op: str, addr: str) -> bytes:
    return bytes([2]) + pickle.dumps([op, addr, TCPNode(addr)])


def test_check_members_accepts_the_recorded_set_or_one_pending_in_the_journal(
    tmp_path: Path,
) -> None:
    me, b, c, d = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"
    assert check_members(str(tmp_path), me, [b]) is None  # a first start: nothing recorded
    (tmp_path / MEMBERS_FILE).write_text(json.dumps({"v": 1, "members": [me, b, c], "index": 3}))
    assert check_members(str(tmp_path), me, [c, b, me]) == ([me, b, c], 3)  # order, self: no matter
    for wrong in ([], [b], [b, c, d]):
        with pytest.raises(MembersMismatch) as exc:
            check_members(str(tmp_path), me, wrong)
        text = str(exc.value)
        assert f"recorded {me},{b},{c}" in text, text
        assert "given " + ",".join(sorted({me, *wrong})) in text, text

    # The journal holds `cluster add d` that this node had not applied when it stopped (index
    # 4 > 3): the set before and the set after it are both right; a change the record already
    # covers (index 2) is not replayed (it would offer a set without c).
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    journal.add(_membership_entry("rem", c), 2, 1)
    journal.add(b"\x01", 3, 1)
    journal.add(_membership_entry("add", d), 4, 1)
    journal._destroy()
    assert check_members(str(tmp_path), me, [b, c]) == ([me, b, c], 3)
    assert check_members(str(tmp_path), me, [b, c, d]) == ([me, b, c], 3)
    with pytest.raises(MembersMismatch, match=f"or {me},{b},{c},{d}, given {me},{b} \\("):
        check_members(str(tmp_path), me, [b])


def _start_refused(cluster: Cluster, node: Node, peers: list[str]) -> str:
    """Start ``node`` with ``--peers peers``: it must exit 2 saying why in its last line."""
    node.peers = peers
    with pytest.raises(RuntimeError, match="broker did not become ready"):
        cluster.start([node])
    assert node.proc.proc is not None
    assert node.proc.proc.wait(10) == 2
    err = node.proc.logs[-1].read_text()
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("tq: --peers does not match the members"), line
    return line


def test_a_member_restarted_with_other_peers_is_refused_until_they_match(
    make_cluster: MakeCluster,
) -> None:
    """A follower restarted with ``--peers ""`` on its data dir used to elect itself leader of a
    cluster of one, acknowledge writes alone, and on rejoining replace entries the majority had
    acknowledged. After ``tq cluster add`` the new member set is recorded on every node, and a
    restart names it."""
    cluster = make_cluster(3)
    leader = cluster.wait_leader()
    victim = next(n for n in cluster.nodes if n is not leader)
    good = list(victim.peers)
    cluster.kill(victim)
    members = ",".join(sorted([victim.raft_addr, *good]))
    line = _start_refused(cluster, victim, [])
    assert f"recorded {members}, given {victim.raft_addr} " in line, line
    _start_refused(cluster, victim, [*good, f"{HOST}:1"])

    victim.peers = good
    cluster.start([victim])
    cluster.wait_leader()

    # A fourth member joins: added, then started with the current members (docs/cli.md).
    new = cluster.new_node(peers=[n.raft_addr for n in cluster.nodes[:3]])
    proc = tq_cli("cluster", "add", new.raft_addr, "--broker", cluster.urls(cluster.nodes[:3]))
    assert proc.returncode == 0, proc.stderr
    cluster.start([new])
    four = sorted(n.raft_addr for n in cluster.nodes)
    for n in cluster.nodes:
        wait_until(
            lambda n=n: (n.cluster() or {}).get("members") == four,
            10,
            what=f"{n.name} recorded the four members",
        )
    cluster.kill(victim)
    _start_refused(cluster, victim, good)  # the old list: no longer the members
    victim.peers = [a for a in four if a != victim.raft_addr]
    cluster.start([victim])
    cluster.wait_converged()


# --- 3. a member with another secret is named ----------------------------------------------------


def test_a_member_with_another_secret_is_named_in_the_logs_and_status(tmp_path: Path) -> None:
    """pysyncobj drops a connection whose messages do not decrypt without a word: the node sat
    at term 0 for ever and no log said why."""
    cluster = Cluster(tmp_path, 3)
    try:
        other = tmp_path / "other.secret"
        other.write_text("not-the-cluster-secret-at-all\n")
        other.chmod(0o600)
        n1, n2, n3 = cluster.nodes
        cluster.start([n1, n2])
        n3.proc.args = n3.args(other, cluster.extra_args)
        n3.proc.start(n3.client_port)
        cluster.wait_leader(among=[n1, n2])

        def named() -> dict[str, Any]:
            views = {n.name: (n.cluster() or {}).get("peer_auth_failures") for n in cluster.nodes}
            return views if views["n3"] and (views["n1"] or views["n2"]) else {}

        views = wait_until(named, 10, interval=0.1, what="every side reports the failure")
        assert any(k.startswith(HOST) for k in views["n3"]), views
        logs = {n.name: "".join(tail(p, 200) for p in n.proc.logs) for n in cluster.nodes}
        for name, text in logs.items():
            assert "not-the-cluster-secret" not in text, name
            assert "tq-cluster-tests" not in text, name
        assert "raft.peer_auth_failed" in logs["n3"], logs["n3"]
        said = logs["n1"].count("raft.peer_auth_failed") + logs["n2"].count("raft.peer_auth_failed")
        assert 1 <= said <= 4, "once per peer (and way in), not once per retry"
        assert "a different --raft-secret-file?" in logs["n3"]

        rc, status = cluster.status_cli()
        assert rc == 0, status
        shown = {n["node_id"]: n.get("peer_auth_failures") for n in status["nodes"]}
        assert shown["n3"], shown
    finally:
        cluster.close()


# --- 4. a snapshot is made off the Raft thread --------------------------------------------------


class _SlowMachine:
    """A state machine whose snapshot takes a while to pack (a large store's tar)."""

    def applied_index(self) -> int:
        return 0

    def apply(self, index: int, entry: bytes) -> None:
        return None

    def snapshot_begin(self) -> Any:
        def pack(f: Any) -> None:
            time.sleep(1.5)
            f.write(b"the state")

        return pack

    def snapshot(self) -> bytes:
        return b"the state"

    def restore(self, blob: bytes) -> None:
        return None


def test_a_snapshot_does_not_hold_the_raft_thread(tmp_path: Path) -> None:
    """The serializer runs in the Raft thread: it waited for the whole snapshot (checkpoint, tar
    of the store, pickle, fsync), 1.7-2 s with a 65 MB store, on every node at once, and the
    cluster held elections. It now only starts it; the serializeChecker reports the end."""
    from pysyncobj import SERIALIZER_STATE
    from tq.broker.cluster import RaftLog

    _SnapshotStarted = getattr(cluster_module, "_SnapshotStarted", Exception)

    raft = RaftLog("127.0.0.1:7001", [], str(tmp_path), _SlowMachine(), password=None)
    data = ((b"\x01", 5, 1), (b"\x01", 4, 1), set())
    tmp = tmp_path / "raft.snapshot.tmp"

    async def go() -> None:
        raft._loop = asyncio.get_running_loop()

        def serialize() -> float:
            t0 = time.monotonic()
            # raising is how it says "started" to pysyncobj's Serializer
            with contextlib.suppress(_SnapshotStarted):
                raft._serialize_in_raft_thread(str(tmp), data)
            return time.monotonic() - t0

        took = await asyncio.to_thread(serialize)
        assert took < 0.5, f"the Raft thread waited {took:.2f}s for the snapshot"
        assert raft._snapshot_state() == SERIALIZER_STATE.SERIALIZING
        deadline = time.monotonic() + 10
        while (state := raft._snapshot_state()) == SERIALIZER_STATE.SERIALIZING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert state == SERIALIZER_STATE.SUCCESS
        assert raft._snapshot_state() == SERIALIZER_STATE.NOT_SERIALIZING

    asyncio.run(go())
    with (tmp_path / "raft.snapshot").open("rb") as f:
        snap = pickle.load(f)
        state = f.read()  # format 3: the machine's state follows the header, then a trailer
    assert (snap["v"], snap["index"], state[:9]) == (3, 5, b"the state")
    assert len(state) == 9 + cluster_module._SNAP_TRAILER.size
    assert not tmp.exists()
    assert raft.snapshots_taken == 1
