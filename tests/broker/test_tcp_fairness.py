"""One peer's flood must not hold up the others (tq/broker/tcp.py, ``Connection._turn``): a read
of many frames is handled MAX_FRAMES_PER_TURN at a time, the rest in later loop iterations, so a
request from another peer that arrives in the same iteration is answered before the flood is.

Once, one read of 512 Ki tiny frames held the loop for seconds, every other client waiting. A
real ``BrokerCore`` (store, journal) serves two connections whose transports record what they
are given: the event loop's order (one peer's read, then the other's, in one iteration) is
played by hand, which a pair of sockets could not make deterministic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tq.broker.core import BrokerCore
from tq.broker.tcp import MAX_FRAMES_PER_TURN, Connection, TcpServer
from tq.config import BrokerConfig
from tq.protocol.codec import decode_response, encode
from tq.protocol.framing import FrameDecoder
from tq.protocol.messages import PROTOCOL_VERSION, Ack, Hello, Ping, Welcome


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def replies(self) -> list[Any]:
        return [decode_response(body) for body in FrameDecoder(1 << 30).feed(bytes(self.data))]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TcpServer]:
    core = BrokerCore(BrokerConfig(port=0, data_dir=str(tmp_path / "data")))
    core.start()
    try:
        yield TcpServer(core)
    finally:
        core.log.close()
        core.store.close()


def _connected(server: TcpServer) -> tuple[Connection, RecordingTransport]:
    conn = Connection(server.core, server)
    transport = RecordingTransport()
    conn.connection_made(transport)
    conn.data_received(encode(Hello(1, PROTOCOL_VERSION)))
    server.flush()
    assert isinstance(transport.replies()[0], Welcome)
    transport.data.clear()
    return conn, transport


async def test_a_flood_from_one_peer_does_not_hold_up_another(server: TcpServer) -> None:
    flooder, flood_out = _connected(server)
    other, other_out = _connected(server)
    n = 20 * MAX_FRAMES_PER_TURN
    # One loop iteration: the flooder's read of n pings, then the other peer's single ping.
    flooder.data_received(b"".join(encode(Ping(rid)) for rid in range(2, n + 2)))
    other.data_received(encode(Ping(7)))
    server.flush()
    assert other_out.replies() == [Ack(7)]
    answered = len(flood_out.replies())
    assert answered <= MAX_FRAMES_PER_TURN, "the whole flood was handled before the other peer"
    # The rest of the flood is handled in later iterations, in order, none lost.
    for _ in range(n):
        if len(flood_out.replies()) == n:
            break
        await asyncio.sleep(0)
        server.flush()
    assert flood_out.replies() == [Ack(rid) for rid in range(2, n + 2)]
