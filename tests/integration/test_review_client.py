"""Client and worker against brokers that stop answering, a client closed under a waiting thread,
a connect to a broker that never says hello, and text that cannot be encoded.

A hung broker is a real ``tq broker`` under SIGSTOP (its kernel still accepts connections and
takes requests, nobody answers), or an in-process fake that answers hello and nothing else (to
count what it is sent). Two single brokers stand in for a cluster's addresses: what is tested
is the client's, not Raft's (tests/cluster/test_review_failover_client.py has the real thing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from tq import AsyncClient, Client
from tq.client.connection import Connection, Silent
from tq.errors import BadRequest, BrokerUnavailable, OutcomeUnknown, TqError, WaitTimeout
from tq.protocol.codec import decode_request, encode
from tq.protocol.framing import FrameDecoder
from tq.protocol.messages import (
    Ack,
    CancelTask,
    Hello,
    Nack,
    Ping,
    QueryStatus,
    SubmitTask,
    Welcome,
)

from tests.conftest import BrokerProcess, WorkerProcess

StartWorker = Callable[..., WorkerProcess]


@contextlib.contextmanager
def frozen(broker: BrokerProcess) -> Iterator[None]:
    """SIGSTOP the broker (a hung node: connections still open, nothing answered), SIGCONT at
    the end whatever happens."""
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker.proc.pid, signal.SIGCONT)


class MuteBroker:
    """Answers hello (``welcome``, after ``hello_delay_s``) or nothing at all
    (``welcome=False``), and records every request it is sent."""

    def __init__(
        self,
        welcome: bool = True,
        nack_code: str | None = None,
        pings: bool = False,
        hello_delay_s: float = 0.0,
    ) -> None:
        self.welcome = welcome
        self.nack_code = nack_code  # every other request gets a NACK with this code
        self.pings = pings  # answer liveness probes (alive, but never answering the rest)
        self.hello_delay_s = hello_delay_s
        self.hello_seen = asyncio.Event()
        self.requests: list[object] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[object] | None] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.handlers.append(asyncio.current_task())
        with contextlib.suppress(ConnectionError):
            await self._read(reader, writer)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 24)
        while data := await reader.read(65536):
            for body in decoder.feed(data):
                msg = decode_request(body)
                self.requests.append(msg)
                if isinstance(msg, Hello):
                    self.hello_seen.set()
                if self.welcome and isinstance(msg, Hello):
                    if self.hello_delay_s:
                        await asyncio.sleep(self.hello_delay_s)  # a broker slow to answer
                    writer.write(encode(Welcome(msg.rid, msg.version)))
                elif self.pings and isinstance(msg, Ping):
                    writer.write(encode(Ack(msg.rid)))
                elif self.nack_code is not None:
                    writer.write(encode(Nack(msg.rid, self.nack_code, "leadership lost")))


@contextlib.asynccontextmanager
async def mute_broker(
    welcome: bool = True, nack_code: str | None = None, pings: bool = False, **kwargs: float
) -> AsyncIterator[tuple[MuteBroker, str]]:
    mute = MuteBroker(welcome, nack_code, pings, **kwargs)
    server = await asyncio.start_server(mute.serve, "127.0.0.1", 0)
    try:
        yield mute, f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for w in mute.writers:
            w.close()
        # Ended here, not cancelled when the loop closes (asyncio would log that).
        await asyncio.gather(*(t for t in mute.handlers if t is not None), return_exceptions=True)
        server.close()
        await server.wait_closed()


# --- a request that gets no answer ---------------------------------------------------------------


def test_a_request_to_a_hung_broker_fails_over_to_the_next_address(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The submit used to wait out ``timeout_s`` on the hung broker's connection and raise,
    never trying the other address; the next request queued on the same connection again."""
    hung, live = broker_factory(), broker_factory()
    with Client(f"{hung.url},{live.url}", timeout_s=1.0, connect_timeout_s=2.0) as c:
        first = c.submit("echo", 1)  # connected to the first address
        with frozen(hung):
            started = time.monotonic()
            tid = c.submit("echo", 2)
            took = time.monotonic() - started
            assert took < 4.0, took
            assert c.status(tid).state == "pending"  # on the live broker, the same connection
        with live.client() as other:
            assert other.status(tid).state == "pending"
            with pytest.raises(TqError):
                other.status(first)  # it went to the other broker


async def test_a_timed_out_request_is_resent_once_and_drops_its_connection() -> None:
    """A broker that is alive but slower than ``timeout_s`` (here: never answers) gets a safe
    request twice (with the same task id), not once per timeout for ever; a request that is
    not safe to repeat is sent once. Either way the connection is dropped: the next request
    connects again instead of queueing behind the unanswered one."""
    async with mute_broker() as (mute, url):
        c = AsyncClient(url, timeout_s=0.3, connect_timeout_s=1.0)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(BrokerUnavailable, match=r"did not answer within 0\.3 s"):
                await c.submit("echo", 1, task_id="t-once")
            assert asyncio.get_running_loop().time() - started < 2.0
            submits = [m.task.id for m in mute.requests if isinstance(m, SubmitTask)]
            assert submits == ["t-once", "t-once"]
            assert (
                sum(isinstance(m, Hello) for m in mute.requests) == 2
            )  # the resend went on a new connection
            assert not c.connected

            with pytest.raises(BrokerUnavailable, match="did not answer"):
                await c.cancel("t-once")
            assert sum(isinstance(m, CancelTask) for m in mute.requests) == 1
            assert not c.connected
        finally:
            await c.close()


def test_a_worker_leaves_a_hung_broker_for_the_next_address(
    broker_factory: Callable[..., BrokerProcess], start_worker: StartWorker
) -> None:
    """Its heartbeats timed out and were skipped, and it claimed again on the same connection,
    for ever: nothing ran while another broker had work. A heartbeat unanswered for the
    broker's heartbeat timeout (twice that) now drops the connection, and the worker reconnects."""
    hung = broker_factory("--heartbeat-timeout", "1")
    live = broker_factory("--heartbeat-timeout", "1")
    start_worker(f"{hung.url},{live.url}", "-c", "1")
    with hung.client(timeout_s=5.0) as c:
        assert c.wait(c.submit("echo", 1), timeout_s=5).state == "completed"  # on the hung one
    with frozen(hung), live.client(timeout_s=5.0) as c:
        tid = c.submit("echo", 2)
        assert c.wait(tid, timeout_s=10).state == "completed"


# --- close() from another thread -----------------------------------------------------------------


def test_close_from_another_thread_ends_a_waiting_call(broker: BrokerProcess) -> None:
    """``wait`` in one thread, ``close`` in another: the wait's request failed, was resent by
    reconnecting the closed client, and the portal's loop stopped under it: the waiting thread
    blocked for ever. It now raises, and the closed client refuses further calls."""
    c = broker.client(timeout_s=5.0)
    c.__enter__()
    tid = c.submit("sleep", 100)  # no worker: never finishes
    result: list[BaseException | object] = []

    def waiter() -> None:
        try:
            result.append(c.wait(tid, timeout_s=5))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.3)  # the wait is parked at the broker
    c.close()
    thread.join(3.0)
    assert not thread.is_alive(), "the waiting thread is still blocked after close()"
    assert isinstance(result[0], BrokerUnavailable), result
    assert "client closed" in str(result[0])
    with pytest.raises(BrokerUnavailable, match="client closed"):
        c.status(tid)


async def test_close_fails_the_requests_in_flight_but_not_later_ones(
    broker: BrokerProcess,
) -> None:
    """An ``AsyncClient`` request in flight when it is closed fails instead of connecting the
    closed client again; one made afterwards connects (the TUI drops a silent link so)."""
    c = AsyncClient(broker.url, timeout_s=5.0)
    try:
        tid = await c.submit("sleep", 100)
        waiting = asyncio.ensure_future(c.wait(tid, timeout_s=5))
        await asyncio.sleep(0.3)
        await c.close()
        with pytest.raises(BrokerUnavailable, match="client closed"):
            await asyncio.wait_for(waiting, 2.0)
        assert (await c.status(tid)).state == "pending"
    finally:
        await c.close()


# --- connect_timeout_s ---------------------------------------------------------------------------


async def test_connect_timeout_bounds_a_hello_nobody_answers(broker: BrokerProcess) -> None:
    """The hello waited ``timeout_s`` (here 10 s) on a broker that accepts but never answers,
    and the error ended in an empty ": ". The connect now gives up on it within
    ``connect_timeout_s`` and says why; with another address, that one is tried in time."""
    loop = asyncio.get_running_loop()
    async with mute_broker(welcome=False) as (_, silent):
        c = AsyncClient(silent, timeout_s=10.0, connect_timeout_s=1.0)
        started = loop.time()
        with pytest.raises(BrokerUnavailable) as caught:
            await asyncio.wait_for(c.connect(), 4.0)
        assert loop.time() - started < 2.0
        assert str(caught.value).endswith(": connected, but no hello answer within 1 s")

        c = AsyncClient(f"{silent},{broker.url}", timeout_s=10.0, connect_timeout_s=1.0)
        try:
            started = loop.time()
            await asyncio.wait_for(c.connect(), 4.0)
            assert loop.time() - started < 2.5
            assert c.welcome is not None
        finally:
            await c.close()


# --- text that is not text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.status("id\udcff"),
        lambda c: c.submit("echo\udcff"),
        lambda c: c.submit("echo", queue="q\udcff"),
        lambda c: c.list(queue="q\udcff"),
    ],
    ids=["status-id", "submit-name", "submit-queue", "list-queue"],
)
def test_a_lone_surrogate_is_a_bad_request(
    client: Client, call: Callable[[Client], object]
) -> None:
    """A str with a lone surrogate (os.fsdecode, surrogateescape input) raised msgspec's bare
    UnicodeEncodeError, which is no TqError; the connection stays usable."""
    with pytest.raises(BadRequest, match="not valid text: '\\\\udcff'"):
        call(client)
    assert client.stats()["states"] is not None


async def test_a_request_whose_outcome_is_unknown_is_sent_again_only_if_safe() -> None:
    """A leader that stepped down after taking a request answers OUTCOME_UNKNOWN: a later leader
    may still apply it. A cancel used to be sent again like any NOT_LEADER, and when the first
    had taken effect the second answered INVALID_STATE, which read as a failure."""
    async with mute_broker(nack_code=OutcomeUnknown.code) as (mute, url):
        c = AsyncClient(url, timeout_s=2.0, connect_timeout_s=1.0)
        try:
            with pytest.raises(OutcomeUnknown):
                await c.cancel("t1")
            assert sum(isinstance(m, CancelTask) for m in mute.requests) == 1
            with pytest.raises(TimeoutError):  # a submit, by its id, is sent again meanwhile
                await asyncio.wait_for(c.submit("echo", 1, task_id="t2"), 1.0)
            assert sum(isinstance(m, SubmitTask) for m in mute.requests) >= 2
        finally:
            await c.close()


# --- liveness probes ------------------------------------------------------------------------------


async def test_a_hung_broker_is_given_up_after_a_liveness_probe_not_the_whole_timeout(
    broker: BrokerProcess,
) -> None:
    """With requests in flight and nothing heard for ``liveness_s``, the client pings; nothing
    after as long again, and the requests fail over as if timed out. A hung leader held every
    request for its whole ``timeout_s`` (30 s by default, longer for a wait)."""
    c = AsyncClient(broker.url, timeout_s=60.0, connect_timeout_s=1.0, liveness_s=0.5)
    try:
        tid = await c.submit("echo", 1)
        loop = asyncio.get_running_loop()
        with frozen(broker):
            started = loop.time()
            # a cancel is not resent: the probe's verdict is the answer
            with pytest.raises(BrokerUnavailable, match="not even a liveness probe"):
                await asyncio.wait_for(c.cancel(tid), 20.0)
            assert loop.time() - started < 3.0
        # connected again; the cancel reached the broker's kernel and was applied once thawed
        assert (await c.status(tid)).state == "cancelled"
        tid = await c.submit("echo", 2)
        with frozen(broker):
            started = loop.time()
            # a wait is safe to resend: after ~1 s of silence it connects again, and the hung
            # broker's kernel accepts that connection, but nobody says hello (1 s)
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(c.wait(tid, timeout_s=100.0), 20.0)
            assert loop.time() - started < 6.0
    finally:
        await c.close()


async def test_a_long_wait_on_a_live_broker_is_not_cut_short_by_probes(
    broker: BrokerProcess,
) -> None:
    """The broker answers the probes (from its loop, at once): a wait that hears nothing else
    for many probe periods runs to its own end."""
    async with AsyncClient(broker.url, liveness_s=0.2) as c:
        tid = await c.submit("echo", 1)  # no worker: it stays pending
        started = asyncio.get_running_loop().time()
        with pytest.raises(WaitTimeout):
            await c.wait(tid, timeout_s=2.0)
        assert asyncio.get_running_loop().time() - started >= 1.9
        assert c.connected


async def test_a_broker_that_answers_pings_but_not_the_request_waits_out_its_timeout() -> None:
    """Alive but slow (here: never answering the request itself) is not hung: the request
    gets its whole ``timeout_s``, as before probes."""

    async with mute_broker(pings=True) as (mute, url):
        c = AsyncClient(url, timeout_s=2.0, connect_timeout_s=1.0, liveness_s=0.2)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(BrokerUnavailable, match=r"did not answer within 2 s"):
                await c.cancel("t-slow")  # not safe to resend: one timeout, then the error
            assert asyncio.get_running_loop().time() - started >= 1.9
            assert sum(isinstance(m, Ping) for m in mute.requests) >= 3
        finally:
            await c.close()


async def test_a_request_still_going_up_a_slow_link_is_not_taken_for_silence(
    broker: BrokerProcess,
) -> None:
    """The ping queues behind the request's own bytes on the same stream, so the broker cannot
    answer it before the upload ends: an 8 MB batch at 512 KB/s failed after 10 s (twice, the
    resend starting over). An upload that moves is progress."""
    rate = 400_000  # bytes/s, client to broker only

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, limit: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(16384 if limit else 65536):
                if limit:
                    await asyncio.sleep(len(data) / limit)
                w.write(data)
                await w.drain()
        w.close()

    writers: list[asyncio.StreamWriter] = []
    handlers: list[asyncio.Task[object] | None] = []

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        port = int(broker.url.rsplit(":", 1)[1])
        br, bw = await asyncio.open_connection("127.0.0.1", port)
        writers.extend((cw, bw))
        await asyncio.gather(pipe(cr, bw, rate), pipe(br, cw, 0))

    # A small receive window, as a slow link has: the bytes not yet through wait in the
    # client's own send queue (on loopback the proxy's kernel would take them all at once).
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    listener.bind(("127.0.0.1", 0))
    proxy = await asyncio.start_server(handle, sock=listener)
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with AsyncClient(url, liveness_s=0.3, timeout_s=30.0) as c:
            started = asyncio.get_running_loop().time()
            ids = await c.submit_batch("echo", [b"x" * 4000] * 300)  # 1.2 MB: ~3 s up
            assert len(ids) == 300
            assert asyncio.get_running_loop().time() - started > 2.0  # it was slow
    finally:
        for w in writers:
            w.close()
        await asyncio.gather(*(t for t in handlers if t is not None), return_exceptions=True)
        for w in writers:
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        proxy.close()
        await proxy.wait_closed()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_liveness_that_is_not_a_positive_number_or_zero_is_refused(bad: float) -> None:
    """-1 declared every request silent within 0.25 s; NaN never probed."""
    with pytest.raises(BadRequest, match="liveness_s"):
        AsyncClient("tcp://127.0.0.1:1", liveness_s=bad)


async def test_requests_waiting_on_a_failed_connect_fail_with_it_not_one_timeout_apart(
    broker: BrokerProcess,
) -> None:
    """Four requests in flight on a hung broker: each reconnect waited its own connect timeout
    behind the one before (failing at 2, 12, 22 and 32 s). Those waiting while an attempt runs
    share its verdict."""
    c = AsyncClient(broker.url, timeout_s=60.0, connect_timeout_s=2.0, liveness_s=0.5)
    try:
        tids = [await c.submit("echo", i) for i in range(4)]
        loop = asyncio.get_running_loop()
        with frozen(broker):
            started = loop.time()

            async def timed(tid: str) -> float:
                with pytest.raises(BrokerUnavailable):
                    await c.status(tid)
                return loop.time() - started

            took = await asyncio.wait_for(asyncio.gather(*(timed(t) for t in tids)), 30.0)
        # ~1 s of silence, then one connect of 2 s that all of them share
        assert max(took) < 5.0, took
    finally:
        await c.close()


async def test_a_connect_made_after_close_is_not_failed_by_an_attempt_begun_before_it() -> None:
    """Waiters share a failed attempt's verdict, but "client closed" belongs only to callers
    from before the close(): one made after it connects again (the TUI relies on it)."""

    async with mute_broker(hello_delay_s=0.3) as (mute, url):
        c = AsyncClient(url, connect_timeout_s=3)
        try:
            before = asyncio.ensure_future(c.connect())  # under way when close() comes
            await asyncio.wait_for(mute.hello_seen.wait(), 5.0)
            await c.close()
            after = asyncio.ensure_future(c.connect())
            first, second = await asyncio.gather(before, after, return_exceptions=True)
            assert isinstance(first, BrokerUnavailable)
            assert "client closed" in str(first)
            assert not isinstance(second, BaseException), second
        finally:
            await c.close()


async def test_a_probe_acknowledged_a_round_trip_later_does_not_reset_the_silence() -> None:
    """On a link slower than the sweep (0.25 s), the ping's own bytes are still unacknowledged
    at the next sweep, then acknowledged by the hung broker's kernel: that counted as an upload
    moving and reset the silence at every probe, so the broker was never given up. (In-process:
    loopback has no round trip; the kernel's unacknowledged bytes are what was written in the
    last 0.4 s.)"""
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, int]] = []

    class Transport:
        def write(self, data: bytes) -> None:
            sent.append((loop.time(), len(data)))

        def get_write_buffer_size(self) -> int:
            return 0

        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

        def abort(self) -> None:
            pass

    def unsent() -> int:
        now = loop.time()
        return sum(n for at, n in sent if now - at < 0.4)

    conn = Connection(1 << 20, liveness_s=0.5)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    conn._unsent = unsent  # type: ignore[method-assign]
    rid = conn.next_rid()
    reply = conn.send(rid, QueryStatus(rid, "t1"), 30.0)
    with pytest.raises(Silent):
        await asyncio.wait_for(reply, 5.0)
    assert loop.time() - sent[0][0] < 2.0
