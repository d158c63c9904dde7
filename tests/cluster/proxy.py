"""A fault-injecting TCP proxy for the Raft links of a test cluster.

Each node advertises ``127.0.0.1:R`` to its peers but its Raft server listens on
``--raft-bind 127.0.0.1:RB``; a :class:`RaftProxy` listener sits on ``R`` and forwards to ``RB``.
Every Raft connection therefore crosses exactly one listener: the one of the node that was dialed
(PySyncObj has only the node with the greater address dial, transport.py ``_shouldConnect``).

To cut a node off in *both* directions the proxy must also know who dialed: a connection arriving
at node B's listener from node A has to be blocked when A is partitioned. The peer of an accepted
socket is ``127.0.0.1:<ephemeral>``, so the proxy asks the kernel which process owns the socket
``laddr == that peer, raddr == this listener`` (``psutil``, over the pids the harness registered)
and maps the pid to a node name. A connection nobody can be matched to (a CLI, a stray client) has
origin ``None`` and belongs to the default group.

Faults (all take effect before the call returns):

* ``partition("n1")`` / ``split(["n1"], ["n2"])``: nodes in different groups cannot talk. Nodes not
  named stay in the default group, so ``partition("n1")`` isolates n1 from everyone else.
  ``mode="blackhole"`` (default): connections stay open but every byte crossing the cut is read and
  discarded, and new connections across the cut are accepted and never forwarded - the peers see a
  silent network and only their own timeouts notice. ``mode="reset"``: connections across the cut
  are closed at once and new ones are closed right after accept.
* ``heal()``: one group again. Every connection that lost bytes (its stream is no longer a valid
  frame sequence) is closed so both sides reconnect cleanly; untouched ones keep running.

Everything runs on one asyncio loop in a daemon thread, so the proxy works from synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import psutil

T = TypeVar("T")
Mode = Literal["blackhole", "reset"]
Addr = tuple[str, int]

CHUNK = 1 << 16
IDENTIFY_ATTEMPTS = 5
IDENTIFY_RETRY_S = 0.01


@dataclass(eq=False)
class Link:
    """One proxied connection: ``src`` (node that dialed, or None) -> ``dst`` (node dialed)."""

    id: int
    src: str | None
    dst: str
    peer: Addr
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    forwarded: int = 0
    dropped: int = 0
    tainted: bool = False  # bytes were dropped: the stream cannot be resumed
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.upstream):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()


@dataclass
class _Listener:
    name: str
    listen: Addr
    target: Addr
    server: asyncio.base_events.Server | None = None


class RaftProxy:
    """``proxy.add("n1", listen=("127.0.0.1", R), target=("127.0.0.1", RB))`` per node, then
    ``partition``/``split``/``heal``. ``pids`` returns ``{pid: node name}`` of the live nodes
    (called on every new connection, so restarted nodes are found under their new pid)."""

    def __init__(self, pids: Callable[[], dict[int, str]] | None = None) -> None:
        self._pids = pids or dict
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raft-proxy", daemon=True
        )
        self._thread.start()
        self._listeners: dict[str, _Listener] = {}
        self._links: set[Link] = set()
        self._ids = itertools.count(1)
        self._group: dict[str, int] = {}
        self.mode: Mode = "blackhole"
        self.unidentified = 0  # connections whose origin could not be matched to a node
        self.refused = 0  # connections closed at accept (reset mode) or upstream unreachable
        self.events: list[tuple[float, str]] = []  # (monotonic time, what): for failure reports
        # Every stream the proxy accepted or dialed, and the accepts still setting a link up:
        # close() ends them all, so no socket outlives the proxy's loop.
        self._writers: list[asyncio.StreamWriter] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- thread plumbing -------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close_all(self) -> None:
        # Accepts still identifying their dialer or dialing the node would otherwise resume
        # after this pass (or never, once the loop stops), their sockets open until GC.
        self._stopping = True
        for lst in self._listeners.values():
            if lst.server is not None:
                lst.server.close()
        for link in list(self._links):
            link.close()
        self._links.clear()
        for _ in range(3):  # accepts of connections the listeners took just before closing
            await asyncio.sleep(0)
        accepting = list(self._accepting)
        for task in accepting:
            task.cancel()
        await asyncio.gather(*accepting, return_exceptions=True)
        for w in self._writers:
            w.transport.abort()
        # The aborted transports close their sockets on the next iteration: wait for it.
        closing = [w.wait_closed() for w in self._writers]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 2.0)
        self._writers.clear()
        await self._loop.shutdown_default_executor()

    def __enter__(self) -> RaftProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    # --- listeners -------------------------------------------------------------------------------

    def add(self, name: str, listen: Addr, target: Addr) -> None:
        """Listen on ``listen`` (the node's advertised Raft address), forward to ``target``."""
        assert name not in self._listeners, f"{name} already proxied"
        lst = _Listener(name, listen, target)
        self._listeners[name] = lst

        async def start() -> None:
            lst.server = await asyncio.start_server(
                lambda r, w: self._accept(lst, r, w), listen[0], listen[1], reuse_address=True
            )

        self._call(start())
        self._note(f"listen {name} {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}")

    # --- faults ----------------------------------------------------------------------------------

    def split(self, *groups: Iterable[str], mode: Mode = "blackhole") -> None:
        """Nodes in different groups cannot reach each other; unnamed nodes form group 0."""
        assignment: dict[str, int] = {}
        for gid, group in enumerate(groups, start=1):
            for name in group:
                assert name not in assignment, f"{name} in two groups"
                assignment[name] = gid

        async def apply() -> None:
            self._group = assignment
            self.mode = mode
            for link in list(self._links):
                # blackhole: the pumps discard from now on (and taint the link)
                if mode == "reset" and self._blocked(link.src, link.dst):
                    self._drop(link)

        self._call(apply())
        self._note(f"split {[sorted(g) for g in map(set, groups)]} mode={mode}")

    def partition(self, *names: str, mode: Mode = "blackhole") -> None:
        """Cut each named node off from every other node (and from each other)."""
        self.split(*([n] for n in names), mode=mode)

    def heal(self) -> None:
        """Everyone can talk again; connections that lost bytes are closed (peers reconnect)."""

        async def apply() -> None:
            self._group = {}
            for link in list(self._links):
                if link.tainted:
                    self._drop(link)

        self._call(apply())
        self._note("heal")

    def blocked(self, src: str | None, dst: str) -> bool:
        return self._blocked(src, dst)

    def _blocked(self, src: str | None, dst: str) -> bool:
        if src == dst:
            return False
        g = self._group
        return g.get(src or "", 0) != g.get(dst, 0)

    # --- introspection ---------------------------------------------------------------------------

    def links(self) -> list[dict[str, Any]]:
        async def snap() -> list[dict[str, Any]]:
            return [
                {
                    "id": link.id,
                    "src": link.src,
                    "dst": link.dst,
                    "forwarded": link.forwarded,
                    "dropped": link.dropped,
                    "tainted": link.tainted,
                }
                for link in sorted(self._links, key=lambda x: x.id)
            ]

        return self._call(snap())

    def describe(self) -> str:
        t0 = self.events[0][0] if self.events else 0.0
        lines = [f"{t - t0:8.3f}s {what}" for t, what in self.events[-60:]]
        lines += [f"link {x}" for x in self.links()]
        lines.append(f"unidentified={self.unidentified} refused={self.refused}")
        return "\n".join(lines)

    # --- connections -----------------------------------------------------------------------------

    def _identify(self, peer: Addr, listen: Addr) -> str | None:
        """The node whose process owns the socket ``peer -> listen`` (None if no known node)."""
        for _ in range(IDENTIFY_ATTEMPTS):
            for pid, name in self._pids().items():
                try:
                    conns = psutil.Process(pid).net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                for c in conns:
                    if (
                        c.laddr
                        and c.raddr
                        and (c.laddr.ip, c.laddr.port) == peer
                        and (c.raddr.ip, c.raddr.port) == listen
                    ):
                        return name
            time.sleep(IDENTIFY_RETRY_S)
        return None

    async def _accept(
        self, lst: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.append(writer)
        if self._stopping:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._accepting.add(task)
        try:
            await self._set_up(lst, reader, writer)
        finally:
            self._accepting.discard(task)

    async def _set_up(
        self, lst: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")[:2]
        loop = asyncio.get_running_loop()
        src = await loop.run_in_executor(None, self._identify, (peer[0], peer[1]), lst.listen)
        if src is None:
            self.unidentified += 1
        link = Link(next(self._ids), src, lst.name, peer, writer)
        self._links.add(link)
        self._note(f"accept #{link.id} {src}->{lst.name}")
        if self._blocked(src, lst.name):
            if self.mode == "reset":
                self.refused += 1
                self._drop(link)
                return
            # Blackhole: swallow whatever the dialer sends; never reach the node.
            link.tainted = True
            link.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            await self._sink(link, reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*lst.target)
        except OSError:
            self.refused += 1
            self._drop(link)
            return
        self._writers.append(up_writer)
        link.upstream = up_writer
        if link.closed:  # dropped while we connected
            up_writer.transport.abort()
            return
        a = asyncio.create_task(self._pump(link, reader, up_writer))
        b = asyncio.create_task(self._pump(link, up_reader, writer))
        link.tasks += [a, b]

    async def _sink(self, link: Link, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(CHUNK):
                link.dropped += len(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._drop(link)

    async def _pump(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # One direction of the link; the cut is symmetric, so both directions check the link.
        try:
            while data := await reader.read(CHUNK):
                if self._blocked(link.src, link.dst):
                    link.dropped += len(data)
                    link.tainted = True
                    continue
                writer.write(data)
                link.forwarded += len(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._drop(link)

    def _drop(self, link: Link) -> None:
        if not link.closed:
            self._note(f"close #{link.id} {link.src}->{link.dst} dropped={link.dropped}")
        self._links.discard(link)
        link.close()
