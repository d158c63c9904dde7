"""Peers that go away at a bad moment, never read, or send what a well-behaved client never
would: the broker must neither lose work to them nor let them hurt anybody else. Each test
reproduces a bug found by fuzzing a real broker over raw sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from tq import AsyncClient
from tq.errors import TqError
from tq.protocol.codec import encode
from tq.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    ClaimTask,
    Hello,
    Leased,
    LeaseRef,
    Outcome,
    QueryStatus,
    ReleaseTasks,
    SubmitTask,
    TaskInfoReply,
    TaskResult,
    TaskSpec,
    WaitTask,
    Welcome,
)

from tests.conftest import BrokerProcess, wait_until
from tests.integration.test_bad_input import RawConnection

BrokerFactory = Callable[..., BrokerProcess]


def test_a_claim_served_as_its_connection_closes_is_not_parked_again(
    broker_factory: BrokerFactory,
) -> None:
    """W2's parked claim is being served (an empty commit: W1 took the task) when W2's
    connection closes. It used to be parked again for the closed connection, then lease the
    next task to W2, which nobody runs: the task waited out the heartbeat timeout and, on its
    last attempt, went to the dead-letter queue without ever running."""
    broker = broker_factory("--heartbeat-timeout", "60")
    for attempt in range(8):
        queue = f"q{attempt}"
        w1 = RawConnection(broker.port)
        w2 = RawConnection(broker.port)
        producer = RawConnection(broker.port)
        try:
            w1.hello(role="worker", client_id=f"w1-{attempt}")
            w2.hello(role="worker", client_id=f"w2-{attempt}")
            producer.hello()
            w1.send(ClaimTask(2, [queue], 1, 60_000))
            # max 1000: a claim that big commits on the writer thread, which leaves time for
            # the close below to land before the commit is durable
            w2.send(ClaimTask(2, [queue], 1000, 60_000))
            time.sleep(0.2)  # both claims parked
            producer.send(SubmitTask(2, TaskSpec(f"first{attempt}", "n", b"{}", queue)))
            w2.close()
            assert isinstance(producer.read(), Ack)
            leased = w1.read()
            assert isinstance(leased, Leased)
            assert leased.tasks[0].task.id == f"first{attempt}"
            time.sleep(0.1)
            victim = f"victim{attempt}"
            reply = producer.request(
                SubmitTask(3, TaskSpec(victim, "n", b"{}", queue, max_retries=0))
            )
            assert isinstance(reply, Ack)
            time.sleep(0.3)
            status = producer.request(QueryStatus(4, victim))
            assert isinstance(status, TaskInfoReply)
            assert status.task.state == "pending", (attempt, status.task)
        finally:
            w1.close()
            producer.close()


def test_a_frame_nested_too_deeply_is_nacked_and_the_connection_stays_usable(
    broker_factory: BrokerFactory,
) -> None:
    """Working out the request id of the bad frame raised RecursionError out of
    ``data_received``: no NACK, and the connection was torn down."""
    conn = RawConnection(broker_factory().port)
    try:
        conn.hello()
        conn.send_frame(b"\x93\xa6submit\x05" + b"\x91" * 200_000 + b"\xc0")
        conn.expect_nack("BAD_REQUEST", rid=0)
        conn.assert_usable()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"host": "h" * 9 * 1024 * 1024},
        {"host": "line\nbreak\x1b[31m"},
        {"queues": ["\n\x1b[31m"]},
        {"queues": [f"q{i}" for i in range(101)]},
        {"pid": -1},
        {"concurrency": -5},
    ],
    ids=["huge-host", "control-chars", "bad-queue", "101-queues", "negative-pid", "negative-conc"],
)
def test_what_a_worker_says_about_itself_is_checked(
    broker_factory: BrokerFactory, fields: dict[str, Any]
) -> None:
    """Stored and shown to everybody: a 9 MiB host made every stats reply too big to send, so
    ``tq stats`` and ``tq workers`` failed for all users."""
    broker = broker_factory("--max-frame", str(32 * 1024 * 1024))
    conn = RawConnection(broker.port)
    try:
        conn.send(Hello(1, PROTOCOL_VERSION, role="worker", client_id="w1", **fields))
        conn.expect_nack("BAD_REQUEST", rid=1)
        with broker.client() as c:
            assert c.stats()["workers"] == []
    finally:
        conn.close()


def test_an_unknown_id_is_not_echoed_whole(broker_factory: BrokerFactory) -> None:
    conn = RawConnection(broker_factory().port)
    try:
        conn.hello()
        conn.send(QueryStatus(2, "x" * 100_000))
        nack = conn.expect_nack("TASK_NOT_FOUND", rid=2)
        assert len(nack.message) < 200
    finally:
        conn.close()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_peer_that_does_not_read_gets_no_more_than_a_megabyte_ahead(
    broker_factory: BrokerFactory,
) -> None:
    """Status requests of 17 bytes each ask for a MiB of reply each: the broker answered every
    request of a read at once, buffering all the replies for a peer that was not reading (four
    such peers pinned a gigabyte). Now it handles a peer's frames only while less than a MiB
    of its replies waits, and stops reading from it meanwhile; the replies come once it reads."""
    broker = broker_factory()
    with broker.client() as c:
        c.submit("echo", {"big": "x" * (1 << 20)}, task_id="big")
    assert broker.proc is not None
    before = _rss_mb(broker.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", broker.port))
    try:
        sock.sendall(encode(Hello(1, PROTOCOL_VERSION)))
        sock.sendall(encode(QueryStatus(7, "big")) * 60)  # 60 MiB of replies
        time.sleep(1.0)
        with broker.client() as c:  # everybody else is served meanwhile
            assert c.status("big").state == "pending"
        grown = _rss_mb(broker.proc.pid) - before
        assert grown < 25, f"broker RSS grew {grown:.0f} MB for a peer that does not read"
        peer = RawConnection.__new__(RawConnection)  # the same socket, now reading
        peer.sock, peer._buf = sock, b""
        sock.settimeout(30)
        replies = [peer.read() for _ in range(61)]
        assert isinstance(replies[0], Welcome)
        assert all(isinstance(r, TaskInfoReply) and r.task.id == "big" for r in replies[1:])
    finally:
        sock.close()


def test_open_waits_and_claims_per_connection_are_bounded(broker_factory: BrokerFactory) -> None:
    """100,000 waits on one connection cost the broker 239 MB; 100,000 parked claims made one
    submit stall every client for 1.8 s."""
    broker = broker_factory()
    waiter = RawConnection(broker.port)
    worker = RawConnection(broker.port)
    try:
        waiter.hello()
        with broker.client() as c:
            c.submit("echo", {}, task_id="t1")
        waiter.send_bytes(b"".join(encode(WaitTask(10 + i, "t1", 60_000)) for i in range(10_001)))
        nack = waiter.expect_nack("BAD_REQUEST", rid=10_010)
        assert "10000 waits" in nack.message
        worker.hello(role="worker", client_id="w1")
        worker.send_bytes(
            b"".join(encode(ClaimTask(10 + i, ["idle"], 1, 60_000)) for i in range(17))
        )
        nack = worker.expect_nack("BAD_REQUEST", rid=26)
        assert "16 claims" in nack.message
        with broker.client() as c:
            assert c.stats()["counters"]["waits"] == 10_000
    finally:
        waiter.close()
        worker.close()


def test_replies_bigger_than_the_frame_limit_still_reach_the_client(
    broker_factory: BrokerFactory,
) -> None:
    """Not hostile at all: a 9 MiB payload with a 9 MiB result, and three 6 MiB results, are
    within every limit, but the status reply (18 MiB) and a list page (27 MiB) were over the
    16 MiB frame limit, so ``status``, ``wait`` and ``list`` failed with FRAME_TOO_LARGE."""
    broker = broker_factory()
    worker = RawConnection(broker.port, timeout=30)
    try:
        with broker.client() as c:
            c.submit("echo", "p" * (9 << 20), task_id="big")
            worker.hello(role="worker", client_id="w1")
            results = {"big": 9 << 20, "r0": 6 << 20, "r1": 6 << 20, "r2": 6 << 20}
            for i, (tid, size) in enumerate(results.items()):
                if tid != "big":
                    c.submit("echo", {}, task_id=tid)
                leased = worker.request(ClaimTask(10 + i, ["default"], 1))
                assert isinstance(leased, Leased)
                token = leased.tasks[0].token
                outcome = Outcome(tid, token, True, b'"' + b"r" * size + b'"')
                assert isinstance(worker.request(TaskResult(20 + i, outcome)), Ack)
            assert c.status("big").result == "r" * (9 << 20)
            assert c.wait("big", timeout_s=5).state == "completed"
            listed = c.list("completed", limit=50)
            assert sorted(t.id for t in listed) == sorted(results)
    finally:
        worker.close()


def test_a_connection_that_never_says_hello_is_closed(broker_factory: BrokerFactory) -> None:
    """Idle sockets held file descriptors for ever; one that said hello stays open."""
    broker = broker_factory("--hello-timeout", "1.5")
    silent = RawConnection(broker.port, timeout=20)
    talker = RawConnection(broker.port, timeout=20)
    try:
        talker.hello()
        t0 = time.monotonic()
        silent.assert_closed()
        assert 1.2 < time.monotonic() - t0 < 6
        talker.assert_usable()
        assert broker.events("tcp.no_hello_closed")
    finally:
        silent.close()
        talker.close()


async def _release_while_served(url: str, trials: int) -> int:
    """A stopping worker's release lands while its parked claim is being served (appended, on
    the writer thread, not yet durable). Returns how many claims were never answered."""
    worker = AsyncClient(url, role="worker", client_id="w-race", timeout_s=10)
    producer = AsyncClient(url)
    unanswered = 0
    try:
        await worker.connect()
        await producer.connect()
        # a big batch puts the commit on the writer thread: time for the release to land
        pad = [producer.make_spec("echo", "y" * 2000, queue="pad") for _ in range(3000)]
        for trial in range(trials):
            queue = f"q{trial}"
            claim = asyncio.ensure_future(
                worker.call(
                    lambda rid, q=queue: ClaimTask(rid, [q], 1, 60_000),  # type: ignore[misc]
                    Leased,
                    retry=False,
                    timeout_s=3,
                )
            )
            await asyncio.sleep(0.05)  # parked
            spec = producer.make_spec("echo", trial, queue=queue, max_retries=0)
            submitted = asyncio.ensure_future(producer.submit_specs([*pad, spec]))
            await asyncio.sleep((trial % 10) * 0.004)
            await worker.call(lambda rid: ReleaseTasks(rid, []), Ack, retry=False)
            await submitted
            try:
                leased = await claim
            except TqError:
                unanswered += 1
                continue
            refs = [LeaseRef(t.task.id, t.token) for t in leased.tasks]
            await worker.call(lambda rid, r=refs: ReleaseTasks(rid, r), Ack, retry=False)  # type: ignore[misc]
    finally:
        await worker.close()
        await producer.close()
    return unanswered


def test_a_release_while_a_claim_is_being_served_still_answers_the_claim(
    broker_factory: BrokerFactory,
) -> None:
    """Such a claim was marked dropped as if its connection had closed: never answered, it
    counted against the connection's 16 open claims for good, and the task it leased sat
    'running' under a worker that never got it (dead at the worker's exit with max_retries 0)."""
    broker = broker_factory()
    assert asyncio.run(_release_while_served(broker.url, 20)) == 0


def test_a_client_that_reads_promptly_is_never_cut_off_for_big_replies(
    broker_factory: BrokerFactory,
) -> None:
    """Seven concurrent status calls of tasks with 10 MiB payloads queued over 64 MiB of replies
    in one tick, and the broker closed the connection as a slow reader."""
    broker = broker_factory()

    async def run() -> list[str]:
        async with AsyncClient(broker.url) as c:
            ids = [await c.submit("echo", "x" * ((10 << 20) - 16)) for _ in range(12)]
            infos = await asyncio.gather(*(c.status(t) for t in ids))
            return [i.state for i in infos]

    assert asyncio.run(run()) == ["pending"] * 12
    assert broker.events("tcp.slow_reader_closed") == []


def test_a_connection_with_watches_keeps_reading_when_its_watcher_is_slow() -> None:
    """The watch hub keeps up to 4 MiB queued for a slow watcher, above the transport's high
    water: paused, the connection never read again, and tq top's requests on it starved."""
    from types import SimpleNamespace

    from tq.broker.tcp import Connection
    from tq.spin import Spinner

    calls: list[str] = []
    transport = SimpleNamespace(pause_reading=lambda: calls.append("pause"))
    for watches in (1, 0):
        core = SimpleNamespace(
            config=SimpleNamespace(max_frame_bytes=1 << 20),
            watch=SimpleNamespace(owned_by=lambda _conn, n=watches: n),
        )
        conn = Connection(core, SimpleNamespace(spinner=Spinner(0)))  # type: ignore[arg-type]
        conn.transport = transport  # type: ignore[assignment]
        conn.pause_writing()
    assert calls == ["pause"]  # only the connection without watches


def test_connections_over_the_limit_are_closed_and_the_broker_carries_on(
    broker_factory: BrokerFactory,
) -> None:
    """1,100 idle sockets under `ulimit -n 1024` took the descriptors RocksDB needed for its
    next WAL file: the next write failed and the broker stopped. Now a connection over
    --max-connections is closed as it opens, and the broker keeps serving the ones it took."""
    broker = broker_factory("--max-connections", "6")
    address = (broker.host, broker.port)
    with broker.client() as c:  # one of the six, held throughout
        held = [socket.create_connection(address) for _ in range(5)]

        def refused() -> bool:
            s = socket.create_connection(address)
            s.settimeout(0.5)
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False
            if closed:
                s.close()
            else:
                held.append(s)  # taken: the broker had not counted all of the others yet
            return closed

        try:
            wait_until(refused, what="a connection over the limit closed at once")
            assert len(held) == 5
            assert c.status(c.submit("echo", 1)).state == "pending"  # the held one still works
        finally:
            for s in held:
                s.close()
        wait_until(lambda: not refused(), what="room for a new connection")
        for s in held:
            s.close()
        with broker.client() as again:
            assert again.status(again.submit("echo", 2)).state == "pending"
    assert broker.running
    assert "tcp.too_many_connections" in broker.logs[-1].read_text()
