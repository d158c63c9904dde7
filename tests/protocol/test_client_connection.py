"""The client connection's write batching: a request sent with nothing else in flight leaves at
once; the requests of one loop iteration after it leave together, and a large burst leaves in
pieces of at least EARLY_FLUSH_BYTES as it is built (so the broker can start on them), in order.
A recording transport stands in for the socket: this is about what the connection hands the
transport, not about a broker."""

from __future__ import annotations

import asyncio
from typing import Any

from tq.client.aio import CLOSE_WAIT_S, AsyncClient
from tq.client.connection import EARLY_FLUSH_BYTES, Connection
from tq.protocol.codec import encode
from tq.protocol.messages import QueryStatus


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def connected() -> tuple[Connection, RecordingTransport]:
    conn = Connection(1 << 20)
    transport = RecordingTransport()
    conn.connection_made(transport)
    return conn, transport


def request(rid: int) -> QueryStatus:
    return QueryStatus(rid, f"task-{rid:08d}")


async def test_a_request_with_nothing_in_flight_leaves_at_once() -> None:
    """A caller that waits for each reply in turn: its request must not wait for the end of
    the loop iteration (a pass of the loop on every sequential submit)."""
    conn, transport = connected()
    conn.send(1, request(1))
    assert transport.writes == [encode(request(1))]  # before the iteration ends
    conn.close()


async def test_the_requests_that_follow_in_one_iteration_leave_in_one_write() -> None:
    conn, transport = connected()
    for rid in range(1, 11):
        conn.send(rid, request(rid))
    assert transport.writes == [encode(request(1))]  # the rest wait for the end of the iteration
    await asyncio.sleep(0)
    assert transport.writes == [
        encode(request(1)),
        b"".join(encode(request(rid)) for rid in range(2, 11)),
    ]
    conn.close()


async def test_a_large_burst_leaves_in_pieces_while_it_is_built() -> None:
    conn, transport = connected()
    n = 3 * EARLY_FLUSH_BYTES // len(encode(request(1))) + 5
    for rid in range(1, n + 1):
        conn.send(rid, request(rid))
    # Already written before the iteration ends: the first alone, then at least two full pieces.
    assert transport.writes[0] == encode(request(1))
    pieces = transport.writes[1:]
    assert len(pieces) >= 2
    assert all(len(w) >= EARLY_FLUSH_BYTES for w in pieces)
    await asyncio.sleep(0)
    assert b"".join(transport.writes) == b"".join(encode(request(r)) for r in range(1, n + 1))
    assert len(transport.writes[-1]) < EARLY_FLUSH_BYTES  # the rest, at the end of the iteration
    conn.close()


async def test_close_does_not_leave_a_transport_behind_when_the_peer_stops_reading() -> None:
    """A broker that stopped reading (a partition): the requests stay buffered in the transport,
    and a plain close() would wait for them forever. AsyncClient.close() gives up after
    CLOSE_WAIT_S and aborts, so the socket is gone when it returns (before ``asyncio.run`` ends
    and closes the loop, which would leak it)."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_read(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(1 << 20), "127.0.0.1", port)
    client = AsyncClient(f"tcp://127.0.0.1:{port}")
    client._conn = conn
    payload = QueryStatus(1, "x" * 60_000)
    for rid in range(1, 400):  # ~24 MB: far more than the kernel's buffers hold
        conn.send(rid, payload)
    await asyncio.sleep(0)
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() > 0
    started = loop.time()
    await client.close()
    assert loop.time() - started < CLOSE_WAIT_S + 0.5
    assert conn.closed.is_set()
    for w in accepted:
        w.close()
    server.close()
    await server.wait_closed()
