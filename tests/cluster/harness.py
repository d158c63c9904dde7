"""A real 3-5 node ``tq broker`` Raft cluster on 127.0.0.1 for the cluster tests.

* :class:`Cluster` starts ``tq broker --node-id nX --raft-port R --peers ...`` processes (the
  :class:`~tests.conftest.BrokerProcess` of the main suite, so readiness is the broker's own
  ``listening`` line), kills (SIGKILL) and restarts them on the same data dir and ports, and reads
  every node's ``stats()["cluster"]`` to find the leader and to wait for the logs to converge.
  With ``proxy=True`` each node's Raft server binds ``--raft-bind 127.0.0.1:RB`` while it
  advertises ``127.0.0.1:R``, where a :class:`~tests.cluster.proxy.RaftProxy` listener forwards to
  it: the proxy is the network, and ``cluster.proxy.partition(...)`` cuts it.
* :class:`Writer` is the producer of the fault tests: lanes of an ``AsyncClient`` given every
  node's address submit tasks with ids chosen up front, retry a failed submit with the same ids
  (an unknown outcome must not create a second task), and record every attempt and every
  acknowledgement in a :class:`~tests.cluster.history.History`.

Ports: Raft ports and client ports are random free ports in 20000-30000 (outside the ephemeral
range, so a restarted node gets its ports back). Every wait is a bounded poll (``wait_until``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tq import AsyncClient, Client
from tq.errors import TqError
from tq.model import new_ids
from tq.protocol.messages import Ack, Nack, SubmitTask, TaskSpec

from tests.cluster.handlers import MARK
from tests.cluster.history import History
from tests.cluster.proxy import RaftProxy
from tests.conftest import ROOT, BrokerProcess, subprocess_env, tail, wait_until

HOST = "127.0.0.1"
CLUSTER_HANDLERS_APP = str(Path(__file__).resolve().parent / "handlers.py")
SECRET = "tq-cluster-tests-shared-secret"
PORT_RANGE = (20000, 30000)
ALL_STATES = ("pending", "running", "completed", "failed", "dead", "cancelled")
# Counters that describe one process, not the replicated state: they may differ between nodes.
LOCAL_COUNTERS = frozenset({"wal_flushes", "wal_commits"})

ELECTION_TIMEOUT_MAX_S = 1.2  # the implementation's raftMaxTimeout (and leaderFallbackTimeout)


def pick_ports(n: int, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` distinct ports in 20000-30000 that are free on 127.0.0.1 right now."""
    rng = random.SystemRandom()
    taken = set(avoid)
    out: list[int] = []
    for _ in range(1000):
        if len(out) == n:
            return out
        port = rng.randrange(*PORT_RANGE)
        if port in taken:
            continue
        taken.add(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        out.append(port)
    raise RuntimeError(f"could not find {n} free ports in {PORT_RANGE}")


def tq_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m tq *args`` (e.g. ``cluster status --broker ... -o json``)."""
    return subprocess.run(
        [sys.executable, "-m", "tq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=subprocess_env(),
        check=False,
    )


def spec_for(tid: str, record: Path) -> TaskSpec:
    """A ``cluster.mark`` task whose payload names its own id and the worker's record file."""
    return AsyncClient.make_spec(MARK, {"id": tid, "f": str(record)}, task_id=tid)


# --- nodes and the cluster -----------------------------------------------------------------------


@dataclass
class Node:
    name: str
    raft_port: int
    client_port: int
    bind_port: int | None  # where the Raft server really listens when a proxy sits on raft_port
    proc: BrokerProcess
    peers: list[str] = field(default_factory=list)  # raft addresses given as --peers
    _client: Client | None = None

    @property
    def raft_addr(self) -> str:
        return f"{HOST}:{self.raft_port}"

    @property
    def url(self) -> str:
        return f"tcp://{HOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc.running

    @property
    def pid(self) -> int | None:
        return self.proc.proc.pid if self.running and self.proc.proc is not None else None

    def args(self, secret_file: Path, extra: Iterable[str]) -> list[str]:
        out = [
            "--node-id",
            self.name,
            "--raft-port",
            str(self.raft_port),
            "--peers",
            ",".join(self.peers),
            "--raft-secret-file",
            str(secret_file),
        ]
        if self.bind_port is not None:
            out += ["--raft-bind", f"{HOST}:{self.bind_port}"]
        return out + list(extra)

    def client(self) -> Client:
        """A client for this node only (short timeouts), kept between calls."""
        if self._client is None:
            self._client = Client(self.url, timeout_s=3.0, connect_timeout_s=0.5)
        return self._client

    def drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def stats(self) -> dict[str, Any] | None:
        """This node's own ``stats()`` (None if it does not answer)."""
        if not self.running:
            return None
        try:
            st = self.client().stats()
        except (TqError, OSError, TimeoutError):
            self.drop_client()
            return None
        # The client follows NOT_LEADER redirects: make sure it is this node that answered.
        cl = st.get("cluster") or {}
        if cl.get("node_id") not in (None, self.name) or st.get("node_id") not in ("", self.name):
            self.drop_client()
            raise AssertionError(
                f"stats asked of {self.name} at {self.url} were answered by "
                f"{cl.get('node_id') or st.get('node_id')}: followers must answer stats themselves"
            )
        return st

    def cluster(self) -> dict[str, Any] | None:
        st = self.stats()
        return None if st is None else st.get("cluster")


class Cluster:
    """``Cluster(tmp_path, 3)``, then ``start()``; ``close()`` kills everything."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        proxy: bool = False,
        extra_args: Iterable[str] = ("--heartbeat-timeout", "2", "--retry-base", "0.05"),
    ) -> None:
        self.root = root
        self.extra_args = list(extra_args)
        self.secret_file = root / "raft.secret"
        self.secret_file.write_text(SECRET + "\n")
        self.nodes: list[Node] = []
        self.proxy: RaftProxy | None = RaftProxy(self._pids) if proxy else None
        self._used_ports: set[int] = set()
        try:
            for _ in range(size):
                self.new_node()
        except BaseException:  # the caller gets no harness to close: end the proxy's threads here
            self.close()
            raise
        members = [n.raft_addr for n in self.nodes]
        for n in self.nodes:
            n.peers = [a for a in members if a != n.raft_addr]

    # --- membership of the harness ---------------------------------------------------------------

    def _pids(self) -> dict[int, str]:
        return {n.pid: n.name for n in self.nodes if n.pid is not None}

    def new_node(self, peers: list[str] | None = None) -> Node:
        """Create (not start) one more node; ``peers``: its ``--peers`` (default: none yet)."""
        name = f"n{len(self.nodes) + 1}"
        wanted = 3 if self.proxy is not None else 2
        ports = pick_ports(wanted, avoid=self._used_ports)
        self._used_ports.update(ports)
        workdir = self.root / name
        workdir.mkdir()
        proc = BrokerProcess(workdir, data_dir=workdir / "data")
        node = Node(
            name=name,
            raft_port=ports[0],
            client_port=ports[1],
            bind_port=ports[2] if self.proxy is not None else None,
            proc=proc,
            peers=list(peers or []),
        )
        if self.proxy is not None:
            assert node.bind_port is not None
            self.proxy.add(name, (HOST, node.raft_port), (HOST, node.bind_port))
        self.nodes.append(node)
        return node

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def by_url(self, url: str) -> Node:
        return next(n for n in self.nodes if n.url == url)

    def urls(self, nodes: Iterable[Node] | None = None) -> str:
        """``tcp://a,tcp://b,...`` for ``nodes`` (default: every node of the harness)."""
        return ",".join(n.url for n in (self.nodes if nodes is None else nodes))

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running]

    # --- processes -------------------------------------------------------------------------------

    def start(self, nodes: Iterable[Node] | None = None) -> Cluster:
        """Start nodes (default: all) in parallel; returns when each printed its ready line."""
        todo = list(self.nodes if nodes is None else nodes)

        def one(n: Node) -> None:
            n.proc.args = n.args(self.secret_file, self.extra_args)
            n.drop_client()
            n.proc.start(n.client_port)

        with ThreadPoolExecutor(len(todo)) as ex:
            for fut in [ex.submit(one, n) for n in todo]:
                fut.result()
        return self

    def kill(self, node: Node) -> None:
        node.drop_client()
        node.proc.kill()

    def kill_all(self) -> None:
        """SIGKILL every running node at once (a power cut), then reap them."""
        victims = self.running()
        for n in victims:
            assert n.proc.proc is not None
            n.proc.proc.send_signal(signal.SIGKILL)
        for n in victims:
            self.kill(n)

    def restart(self, node: Node) -> None:
        if node.running:
            self.kill(node)
        self.start([node])

    def close(self) -> None:
        for n in self.nodes:
            n.drop_client()
            n.proc.close()
        if self.proxy is not None:
            self.proxy.close()

    def describe(self) -> str:
        out = []
        for n in self.nodes:
            out.append(f"===== {n.name} raft={n.raft_addr} url={n.url} bind={n.bind_port} =====")
            out.extend(f"--- {p.name} ---\n{tail(p, 60)}" for p in n.proc.logs)
        if self.proxy is not None:
            out.append("===== proxy =====\n" + self.proxy.describe())
        return "\n".join(out)

    # --- observing -------------------------------------------------------------------------------

    def views(self, among: Iterable[Node] | None = None) -> dict[str, dict[str, Any] | None]:
        """``{node name: stats()["cluster"] or None}`` for the running nodes of ``among``."""
        return {n.name: n.cluster() for n in (self.running() if among is None else among)}

    def find_leader(self, among: Iterable[Node] | None = None) -> Node | None:
        """The leader, if exactly one node of ``among`` says it leads and every other answering
        node of ``among`` names it, in the same term."""
        nodes = [n for n in (self.running() if among is None else among) if n.running]
        views = self.views(nodes)
        leaders = [n for n in nodes if (views[n.name] or {}).get("role") == "leader"]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        lv = views[leader.name]
        assert lv is not None
        for n in nodes:
            v = views[n.name]
            if v is None:
                return None
            if v.get("leader") != leader.raft_addr or v.get("term") != lv.get("term"):
                return None
        return leader

    def wait_leader(self, timeout: float = 15.0, among: Iterable[Node] | None = None) -> Node:
        group = list(among) if among is not None else None
        return wait_until(
            lambda: self.find_leader(group),
            timeout,
            interval=0.05,
            what=f"one leader among {[n.name for n in (group or self.running())]}",
        )

    def wait_stable_leader(self, hold: float = 1.0, timeout: float = 20.0) -> Node:
        """A leader that stays the leader, in the same term, for ``hold`` seconds (start-up can
        see a second election when a link comes up late)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.wait_leader(timeout=max(0.1, deadline - time.monotonic()))
            view = leader.cluster() or {}
            term = view.get("term")
            until = time.monotonic() + hold
            while time.monotonic() < until:
                v = leader.cluster() or {}
                if v.get("role") != "leader" or v.get("term") != term:
                    break
                time.sleep(0.05)
            else:
                if self.find_leader() is leader:
                    return leader
            assert time.monotonic() < deadline, f"no leader stayed for {hold}s"

    def state_of(self, node: Node) -> dict[str, Any] | None:
        """What must be equal on every node once the logs converged."""
        st = node.stats()
        if st is None:
            return None
        cl = st.get("cluster") or {}
        counters = {k: v for k, v in st.get("counters", {}).items() if k not in LOCAL_COUNTERS}
        return {
            "commit_index": cl.get("commit_index"),
            "applied_index": cl.get("applied_index"),
            "states": st.get("states"),
            "counters": counters,
        }

    def converged(self, nodes: Iterable[Node] | None = None) -> dict[str, Any] | None:
        """The common state if every node of ``nodes`` reports the same one (else None)."""
        states = [self.state_of(n) for n in (self.running() if nodes is None else nodes)]
        if not states or any(s is None for s in states):
            return None
        # No-op and membership entries are committed but never reach the state machine, so
        # applied_index may stay below commit_index: compare nodes, not the two indexes.
        first = states[0]
        return first if all(s == first for s in states) else None

    def wait_converged(self, timeout: float = 20.0, nodes: Iterable[Node] | None = None) -> Any:
        group = list(nodes) if nodes is not None else None

        def check() -> Any:
            return self.converged(group)

        try:
            return wait_until(check, timeout, interval=0.1, what="logs converged")
        except AssertionError as exc:
            views = {n.name: self.state_of(n) for n in (group or self.running())}
            raise AssertionError(f"{exc}\nper node: {json.dumps(views, indent=1)}") from None

    def status_cli(self, nodes: Iterable[Node] | None = None) -> tuple[int, dict[str, Any]]:
        """``tq cluster status --broker <urls> -o json``: (exit code, parsed JSON)."""
        proc = tq_cli("cluster", "status", "--broker", self.urls(nodes), "-o", "json")
        try:
            data = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not JSON: {proc.stdout!r} (stderr {proc.stderr!r})") from exc
        return proc.returncode, data


# --- client-side helpers -------------------------------------------------------------------------


def list_ids(url: str, state: str, page: int = 1000) -> list[str]:
    """Every id in ``state``, read page by page (from the leader: the client follows it)."""

    async def go() -> list[str]:
        out: list[str] = []
        async with AsyncClient(url, timeout_s=10.0, connect_timeout_s=5.0) as c:
            cursor: str | None = None
            for _ in range(10_000):
                tasks, cursor = await c.list_page(state, limit=page, after=cursor)
                out += [t.id for t in tasks]
                if cursor is None:
                    break
        return out

    return asyncio.run(go())


def list_all(url: str) -> dict[str, list[str]]:
    return {state: list_ids(url, state) for state in ALL_STATES}


@dataclass(frozen=True)
class RawReply:
    outcome: str  # "ack", "nack", "timeout" or "error"
    code: str = ""  # the NACK code, or the error text
    leader: str | None = None  # the leader a NOT_LEADER names

    def __str__(self) -> str:
        return f"{self.outcome}:{self.code}" + (f"->{self.leader}" if self.leader else "")


def raw_submit(url: str, spec: TaskSpec, timeout_s: float) -> RawReply:
    """One submit to exactly this broker: no redirect following, no retry."""

    async def go() -> RawReply:
        c = AsyncClient(url, timeout_s=timeout_s, connect_timeout_s=1.0)
        try:
            conn = await c.connect()
            rid = conn.next_rid()
            try:
                reply = await conn.send(rid, SubmitTask(rid, spec), timeout_s)
            except TimeoutError:
                return RawReply("timeout")
            if isinstance(reply, Ack):
                return RawReply("ack")
            if isinstance(reply, Nack):
                return RawReply("nack", reply.code, reply.leader)
            return RawReply("error", f"unexpected {type(reply).__name__}")
        except (TqError, OSError) as exc:
            return RawReply("error", f"{type(exc).__name__}: {exc}")
        finally:
            await c.close()

    return asyncio.run(go())


class Writer:
    """Submits ``total`` ``cluster.mark`` tasks (ids chosen here) from ``lanes`` concurrent lanes of
    one ``AsyncClient(url)``, ``batch`` tasks per request (``batch=1``: single ``submit`` calls).

    A failed submit is retried with the same ids until acknowledged or ``give_up_s`` passed (those
    ids stay "attempted": unknown outcome). Every exception that reaches this code is recorded in
    ``errors`` (time, text): the ``AsyncClient`` follows NOT_LEADER redirects itself, so an error
    here is one the application would see."""

    def __init__(
        self,
        url: str,
        history: History,
        record: Path,
        *,
        total: int,
        batch: int = 200,
        lanes: int = 4,
        attempt_timeout_s: float = 5.0,
        give_up_s: float = 60.0,
    ) -> None:
        self.url = url
        self.history = history
        self.record = record
        self.total = total
        self.batch = batch
        self.lanes = lanes
        self.attempt_timeout_s = attempt_timeout_s
        self.give_up_s = give_up_s
        self.errors: list[tuple[float, str]] = []
        self.gave_up: list[str] = []
        self.requests = 0
        self._taken = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.finished_at: float | None = None

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, name="cluster-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 90.0) -> None:
        """Stop taking new batches; in-flight ones are resolved (acked or given up) first."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float = 120.0) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"writer still running after {timeout}s"
        if self._failure is not None:
            raise AssertionError(f"writer crashed: {self._failure!r}") from self._failure

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait_acked(self, n: int, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.history.acked_count >= n or self.done,
            timeout,
            interval=0.01,
            what=f"{n} acknowledged submits",
        )
        assert self.history.acked_count >= n, f"writer ended early: {self.errors[-5:]}"

    # --- the lanes -------------------------------------------------------------------------------

    def _take(self) -> list[str]:
        if self._stop.is_set():
            return []
        n = min(self.batch, self.total - self._taken)
        if n <= 0:
            return []
        self._taken += n
        return new_ids.many(n)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by join()
            self._failure = exc
        finally:
            self.finished_at = time.monotonic()

    async def _main(self) -> None:
        client = AsyncClient(self.url, timeout_s=self.attempt_timeout_s, connect_timeout_s=1.0)
        try:
            await asyncio.gather(*(self._lane(client) for _ in range(self.lanes)))
        finally:
            await client.close()

    async def _lane(self, client: AsyncClient) -> None:
        while ids := self._take():
            specs = [spec_for(tid, self.record) for tid in ids]
            self.history.attempt(ids)
            first = time.monotonic()
            while True:
                self.requests += 1
                try:
                    if len(specs) == 1:  # a single submit, as Client.submit sends it
                        one = specs[0]
                        reply = await client.call(lambda rid, one=one: SubmitTask(rid, one), Ack)
                        got = list(reply.ids)
                    else:
                        got = await client.submit_specs(specs)
                except (TqError, OSError, TimeoutError) as exc:
                    self.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
                    if time.monotonic() - first > self.give_up_s:
                        self.gave_up += ids
                        break
                    await asyncio.sleep(0.05)
                    continue
                if got != ids:
                    self.errors.append(
                        (time.monotonic(), f"ack ids differ: {got[:3]} != {ids[:3]}")
                    )
                self.history.ack(got)
                break

    def error_summary(self) -> str:
        kinds: dict[str, int] = {}
        for _, text in self.errors:
            key = text.split(":", 1)[0]
            kinds[key] = kinds.get(key, 0) + 1
        return f"{len(self.errors)} errors {kinds}; last: {[t for _, t in self.errors[-3:]]}"
