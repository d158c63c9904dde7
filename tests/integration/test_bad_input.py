"""Whatever a peer sends, the broker answers with a NACK (stable code) or closes that one
connection, and stays healthy for everybody else: these tests speak the wire protocol over a raw
socket, then check that a fresh client still works and that the bad input changed nothing."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from tq import Client
from tq.errors import TaskNotFound
from tq.model import MAX_PAYLOAD_BYTES
from tq.protocol.codec import decode_response, encode, encode_body
from tq.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    ClaimTask,
    GetStats,
    Hello,
    ListTasks,
    Nack,
    Response,
    StatsReply,
    SubmitBatch,
    SubmitTask,
    TaskSpec,
    Welcome,
)

from tests.conftest import BrokerProcess

BrokerFactory = Callable[..., BrokerProcess]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(value: Any) -> bytes:
    """Plain msgpack (no message structs): for shapes the protocol does not allow."""
    return msgspec.msgpack.encode(value)


class RawConnection:
    """A protocol peer with no client library in the way: bytes out, decoded responses in."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, body: bytes) -> None:
        self.send_bytes(frame(body))

    def send(self, msg: Any) -> None:
        self.send_bytes(encode(msg))

    def _recv_exact(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read(self) -> Response | None:
        """The next response, or None once the broker closed the connection."""
        header = self._recv_exact(4)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        body = self._recv_exact(size)
        assert body is not None, "connection closed in the middle of a frame"
        return decode_response(body)

    def request(self, msg: Any) -> Response | None:
        self.send(msg)
        return self.read()

    def hello(self, **fields: Any) -> Response | None:
        return self.request(Hello(1, PROTOCOL_VERSION, **fields))

    def expect_nack(self, code: str, rid: int | None = None) -> Nack:
        reply = self.read()
        assert isinstance(reply, Nack), reply
        assert reply.code == code, reply
        if rid is not None:
            assert reply.rid == rid, reply
        assert reply.message
        return reply

    def assert_usable(self) -> None:
        reply = self.request(GetStats(777))
        assert isinstance(reply, StatsReply), reply
        assert reply.rid == 777

    def assert_closed(self) -> None:
        assert self.read() is None, "the broker should have closed the connection"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[BrokerProcess]:
    """One default broker for the module (overrides conftest's per-test one): every test here
    checks that its bad input changed nothing, so sharing it costs no isolation."""
    failed_before = request.session.testsfailed
    b = BrokerProcess(tmp_path_factory.mktemp("bad-input-broker")).start()
    yield b
    if request.session.testsfailed > failed_before:
        print(b.describe())
    b.close()


@pytest.fixture
def raw_factory() -> Iterator[Callable[[BrokerProcess], RawConnection]]:
    conns: list[RawConnection] = []

    def connect(broker: BrokerProcess) -> RawConnection:
        conn = RawConnection(broker.port)
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        conn.close()


def stats_of(url: str) -> dict[str, Any]:
    with Client(url) as c:
        return c.stats()


def _without_rates(queues: dict[str, Any]) -> dict[str, Any]:
    """Queue stats minus the in/out rates, which move as the rate window slides."""
    return {
        name: {k: v for k, v in q.items() if k not in ("rate_in", "rate_out")}
        for name, q in queues.items()
    }


def assert_healthy_and_unchanged(url: str, before: dict[str, Any]) -> None:
    """A fresh client works, and the bad input left no trace in the task counts."""
    with Client(url) as c:
        after = c.stats()
        assert after["states"] == before["states"]
        assert _without_rates(after["queues"]) == _without_rates(before["queues"])
        ignore = {"wal_flushes", "wal_commits", "spins", "spin_hits"}  # the broker's own work
        assert {k: v for k, v in after["counters"].items() if k not in ignore} == {
            k: v for k, v in before["counters"].items() if k not in ignore
        }
        tid = c.submit("echo", {"still": "works"})
        assert c.status(tid).state == "pending"
        assert c.stats()["states"]["pending"] == before["states"]["pending"] + 1


# --- framing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("say_hello", [True, False], ids=["after-hello", "before-hello"])
def test_frame_over_the_limit_is_refused_and_connection_closed(
    broker_factory: BrokerFactory,
    raw_factory: Callable[[BrokerProcess], RawConnection],
    say_hello: bool,
) -> None:
    broker = broker_factory("--max-frame", "1024")
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    if say_hello:
        assert isinstance(conn.hello(), Welcome)
    conn.send_bytes(struct.pack(">I", 2000) + b"x" * 100)  # header says 2000 > 1024
    nack = conn.expect_nack("FRAME_TOO_LARGE", rid=0)
    assert "1024" in nack.message
    conn.assert_closed()
    assert_healthy_and_unchanged(broker.url, before)


def test_frame_exactly_at_the_limit_is_accepted(
    broker_factory: BrokerFactory, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    limit = 1024
    broker = broker_factory("--max-frame", str(limit))
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)

    def submit(n: int) -> SubmitTask:
        return SubmitTask(2, TaskSpec("edge", "echo", b"7" * n))

    n = limit
    while len(encode_body(submit(n))) > limit:
        n -= 1
    msg = submit(n)
    assert len(encode_body(msg)) == limit
    reply = conn.request(msg)
    assert isinstance(reply, Ack), reply
    assert reply.ids == ["edge"]


def test_garbage_frame_is_nacked_and_connection_stays_usable(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send_frame(b"\xc1\xc1\xc1 definitely not msgpack")
    conn.expect_nack("BAD_FRAME", rid=0)
    conn.send_frame(b"")  # an empty frame is not a message either
    conn.expect_nack("BAD_FRAME", rid=0)
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


def test_truncated_frame_then_close_leaves_broker_fine(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    whole = encode(SubmitTask(2, TaskSpec("cut-short", "echo", b"1" * 100)))
    conn.send_bytes(whole[: len(whole) // 2])
    conn.close()
    # A header cut short, on another connection, before hello.
    other = raw_factory(broker)
    other.send_bytes(b"\x00\x00")
    other.close()
    assert_healthy_and_unchanged(broker.url, before)
    with Client(broker.url) as c, pytest.raises(TaskNotFound):
        c.status("cut-short")


def test_frames_split_byte_by_byte_and_pipelined_are_reassembled(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    conn = raw_factory(broker)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in encode(Hello(1, PROTOCOL_VERSION)):
        conn.send_bytes(bytes([byte]))
    assert isinstance(conn.read(), Welcome)
    conn.send_bytes(b"".join(encode(GetStats(rid)) for rid in range(10, 60)))
    rids = []
    for _ in range(50):
        reply = conn.read()
        assert isinstance(reply, StatsReply), reply
        rids.append(reply.rid)
    assert sorted(rids) == list(range(10, 60))


# --- messages --------------------------------------------------------------------------------


def test_unknown_message_type_is_nacked(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send_frame(packed(["launch_missiles", 5, "now"]))
    conn.expect_nack("UNKNOWN_MESSAGE", rid=5)
    conn.send(Ack(6))  # a response type is not a request
    conn.expect_nack("UNKNOWN_MESSAGE", rid=6)
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


@pytest.mark.parametrize(
    ("body", "rid"),
    [
        (packed(["submit", 6, "not a task spec"]), 6),
        (packed(["submit", 7, ["id-1", "echo", "payload must be bytes"]]), 7),
        (packed(["status", 8, 12345]), 8),
        (packed(["stats", "rid must be an int"]), 0),
        (packed({"t": "stats", "rid": 9}), 0),
        (packed(5), 0),
        (packed([]), 0),
    ],
    ids=["spec-is-str", "payload-is-str", "task-id-is-int", "rid-is-str", "map", "int", "empty"],
)
def test_wrong_field_types_are_nacked_bad_request(
    broker: BrokerProcess,
    raw_factory: Callable[[BrokerProcess], RawConnection],
    body: bytes,
    rid: int,
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send_frame(body)
    conn.expect_nack("BAD_REQUEST", rid=rid)
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


def test_bool_rid_gets_a_decodable_nack(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send_frame(packed(["stats", True]))
    conn.expect_nack("BAD_REQUEST", rid=0)  # decode_response fails on rid=true


def test_request_before_hello_is_nacked_then_hello_works(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    conn.send(SubmitTask(3, TaskSpec("sneaky", "echo", b"1")))
    conn.expect_nack("BAD_REQUEST", rid=3)
    conn.send(GetStats(4))
    conn.expect_nack("BAD_REQUEST", rid=4)
    assert isinstance(conn.hello(), Welcome)
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


def test_second_hello_is_nacked(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send(Hello(2, PROTOCOL_VERSION))
    conn.expect_nack("BAD_REQUEST", rid=2)
    conn.assert_usable()


def test_unsupported_protocol_version_is_nacked_and_closed(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    conn.send(Hello(1, PROTOCOL_VERSION + 98))
    nack = conn.expect_nack("UNSUPPORTED_VERSION", rid=1)
    assert str(PROTOCOL_VERSION) in nack.message
    conn.assert_closed()
    assert_healthy_and_unchanged(broker.url, before)


def test_worker_only_requests_from_a_client_are_nacked(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    with Client(broker.url) as c:
        c.submit("echo", 1)
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)  # role "client"
    conn.send(ClaimTask(2, ["default"], 1, 0))
    conn.expect_nack("BAD_REQUEST", rid=2)
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


def test_nacked_worker_hello_does_not_open_the_session(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    conn = raw_factory(broker)
    conn.send(Hello(1, PROTOCOL_VERSION, role="worker", client_id="not a valid id!"))
    conn.expect_nack("BAD_REQUEST", rid=1)
    conn.send(GetStats(2))
    conn.expect_nack("BAD_REQUEST", rid=2)  # still no (accepted) hello on this connection


def test_list_with_bad_arguments_is_nacked(
    broker: BrokerProcess, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send(ListTasks(2, "bogus-state"))
    conn.expect_nack("BAD_REQUEST", rid=2)
    conn.send(ListTasks(3, "pending", limit=0))
    conn.expect_nack("BAD_REQUEST", rid=3)
    conn.send(ListTasks(4, "pending", after="not-hex"))
    conn.expect_nack("BAD_REQUEST", rid=4)
    conn.assert_usable()


# --- invalid tasks ---------------------------------------------------------------------------

_OK = TaskSpec("valid-id", "echo", b"{}")


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        (msgspec.structs.replace(_OK, name="bad name!"), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, name=""), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, name="x" * 201), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, priority=7), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, priority=-1), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, id="spaces are bad"), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, id="x" * 65), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, queue="bad/queue"), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, max_retries=-1), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, timeout_s=0.0), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, timeout_s=float("nan")), "BAD_REQUEST"),
        (msgspec.structs.replace(_OK, backoff_s=-1.0), "BAD_REQUEST"),
    ],
    ids=[
        "name-chars",
        "name-empty",
        "name-too-long",
        "priority-7",
        "priority-negative",
        "id-chars",
        "id-too-long",
        "queue-chars",
        "max-retries-negative",
        "timeout-zero",
        "timeout-nan",
        "backoff-negative",
    ],
)
def test_invalid_task_is_nacked(
    broker: BrokerProcess,
    raw_factory: Callable[[BrokerProcess], RawConnection],
    spec: TaskSpec,
    code: str,
) -> None:
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    conn.send(SubmitTask(2, spec))
    conn.expect_nack(code, rid=2)
    # In a batch, one bad task refuses the whole batch: nothing of it is stored.
    good = msgspec.structs.replace(_OK, id="good-neighbour")
    conn.send(SubmitBatch(3, [good, spec]))
    nack = conn.expect_nack(code, rid=3)
    assert "task 1" in nack.message
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)


def test_payload_over_10_mib_is_nacked(
    broker_factory: BrokerFactory, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    broker = broker_factory("--max-frame", str(32 * 1024 * 1024))
    before = stats_of(broker.url)
    conn = raw_factory(broker)
    assert isinstance(conn.hello(), Welcome)
    too_big = msgspec.structs.replace(_OK, payload=b"x" * (MAX_PAYLOAD_BYTES + 1))
    conn.send(SubmitTask(2, too_big))
    nack = conn.expect_nack("PAYLOAD_TOO_LARGE", rid=2)
    assert str(MAX_PAYLOAD_BYTES) in nack.message
    conn.assert_usable()
    assert_healthy_and_unchanged(broker.url, before)
    # Exactly at the limit is fine.
    at_limit = msgspec.structs.replace(_OK, id="at-limit", payload=b"x" * MAX_PAYLOAD_BYTES)
    reply = conn.request(SubmitTask(3, at_limit))
    assert isinstance(reply, Ack), reply
    assert reply.ids == ["at-limit"]


def test_many_bad_connections_at_once_leave_broker_healthy(
    broker_factory: BrokerFactory, raw_factory: Callable[[BrokerProcess], RawConnection]
) -> None:
    broker = broker_factory("--max-frame", "4096")
    before = stats_of(broker.url)
    conns = [raw_factory(broker) for _ in range(30)]
    for i, conn in enumerate(conns):
        match i % 3:
            case 0:
                conn.send_bytes(struct.pack(">I", 1 << 31))
            case 1:
                conn.send_frame(b"\xc1")
            case _:
                conn.send_bytes(b"\x00\x00\x00\x10abc")
    for i, conn in enumerate(conns):
        if i % 3 == 0:
            conn.expect_nack("FRAME_TOO_LARGE")
        elif i % 3 == 1:
            conn.expect_nack("BAD_FRAME")
        conn.close()
    assert_healthy_and_unchanged(broker.url, before)
