"""One multiplexed broker connection: many requests in flight, matched to replies by ``rid``."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import select
import struct
import termios
import time
from collections.abc import Callable
from typing import Any, cast

from tq.errors import (
    BadRequest,
    BrokerUnavailable,
    FrameTooLarge,
    NotLeader,
    OutcomeUnknown,
    TqError,
    error_from_code,
)
from tq.model import MAX_PAYLOAD_BYTES
from tq.protocol.codec import decode_response, encode
from tq.protocol.framing import HEADER_BYTES, FrameDecoder
from tq.protocol.messages import ClaimTask, Nack, Ping, Response, WaitTask, Welcome
from tq.spin import ReplyPoll

log = logging.getLogger("tq.client")
SWEEP_S = 0.25
# Requests queued in one loop iteration leave in one write, except that a write goes out as soon
# as this much is queued: a pipelining client that resumes hundreds of coroutines at once then
# lets the broker start on the first requests while it builds the rest, instead of the two
# taking turns (measured: one client, 256 single submits in flight, ~39k -> ~50k tasks/s).
EARLY_FLUSH_BYTES = 16 * 1024
# Requests in flight and nothing heard for this long: ask the broker whether it is there (Ping);
# still nothing after as long again, and the connection is given up (see ``Silent``).
LIVENESS_S = 5.0
# An upload this big still queued is one a slow link is carrying (see _check_liveness).
UPLOAD_BYTES = 64 * 1024


class Silent(TimeoutError):
    """Requests in flight, and nothing heard from the broker, a liveness probe included, for
    twice ``liveness_s``: a hung broker (a stopped process, a frozen VM), whose kernel still
    takes the bytes, so nothing fails by itself. A busy broker answers the probe from its event
    loop at once, and a long ``wait`` on a live broker is never cut short by this."""


class Connection(asyncio.Protocol):
    def __init__(
        self, max_frame_bytes: int, liveness_s: float = LIVENESS_S, spin_us: int = 0
    ) -> None:
        # Replies may exceed the frame limit requests are held to: one task's record carries
        # its payload and its result (up to 10 MiB each) besides its error.
        self._decoder = FrameDecoder(max_frame_bytes + 2 * MAX_PAYLOAD_BYTES + (1 << 20))
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._rids = itertools.count(1)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.error: TqError | None = None
        self.welcome: Welcome | None = None  # the broker's answer to hello, once connected
        self.address = ""  # host:port it was opened to, for messages
        self.timed_out = False  # dropped by the client: a request on it got no answer in time
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self.on_unsolicited: Callable[[Response], None] | None = None
        # Streams (watches): every message under one of these rids after its first reply, and
        # the error that ends the connection.
        self._streams: dict[int, Callable[[Response | TqError], None]] = {}
        # Request deadlines are checked by one sweep timer, not a timer per request: at tens of
        # thousands of requests a second, per-request timers cost more than the request.
        self._deadlines: dict[int, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Liveness (see Silent): reads counted in data_received, compared at each sweep.
        self.liveness_s = liveness_s  # 0: never probe
        self._reads = 0
        self._reads_seen = 0
        self._silent_since = 0.0
        self._probe: int | None = None  # rid of the Ping in flight
        self._written = 0  # bytes handed to the transport
        self._acked_seen = 0
        self._unsent_seen = 0
        self._fd = -1
        self.poll = ReplyPoll(spin_us, self._reply_due)  # see AsyncClient's spin_us
        self._spin_rid = 0  # the last request sent that the broker answers at once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def connection_lost(self, exc: Exception | None) -> None:
        err = self.error or BrokerUnavailable(
            f"connection to broker lost{': ' + str(exc) if exc else ''}"
        )
        self.error = err
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._deadlines.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        streams, self._streams = self._streams, {}
        for callback in streams.values():
            callback(err)
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        if self.poll.budget_ns:
            self.poll.arrived(time.monotonic_ns())
        try:
            frames = self._decoder.feed(data)
            for body in frames:
                msg = decode_response(body)
                fut = self._pending.pop(msg.rid, None)
                self._deadlines.pop(msg.rid, None)
                if fut is None:
                    stream = self._streams.get(msg.rid)
                    if stream is not None:
                        stream(msg)
                    elif isinstance(msg, Nack) and msg.rid == 0:
                        self.error = error_from_code(msg.code, msg.message)
                    elif self.on_unsolicited is not None:
                        self.on_unsolicited(msg)
                    continue
                if not fut.done():
                    fut.set_result(msg)
            if self._decoder.failed:
                self._decoder.feed(b"")  # raises the FrameTooLarge that followed these frames
        except TqError as exc:
            self.error = exc
            if self.transport is not None:
                self.transport.close()

    def next_rid(self) -> int:
        return next(self._rids)

    def send(self, rid: int, msg: Any, timeout_s: float = 30.0) -> asyncio.Future[Response]:
        """Queue ``msg``; the sends of one loop tick leave in one write (or several, each of
        at least ``EARLY_FLUSH_BYTES``), except that one sent with nothing else in flight
        leaves at once. The future fails with
        ``TimeoutError`` if no reply comes within ``timeout_s`` (checked about every 0.25 s)."""
        if self.error is not None or self.transport is None or self.transport.is_closing():
            raise self.error or BrokerUnavailable("not connected to the broker")
        try:
            frame = encode(msg)
        except UnicodeEncodeError as exc:
            # A str that is not text (a lone surrogate, as os.fsdecode or surrogateescape input
            # makes) in a name, queue or id: msgspec's bare UnicodeEncodeError is no TqError, so
            # callers catching TqError (as documented) saw a crash instead of a refusal.
            bad = exc.object[exc.start : exc.end] if isinstance(exc.object, str) else ""
            raise BadRequest(
                f"{type(msg).__name__} request holds a string that is not valid text: "
                f"{bad!r} at position {exc.start} of {str(exc.object)[:80]!r} ({exc.reason})"
            ) from None
        limit = self.welcome.max_frame_bytes if self.welcome is not None else 0
        if limit and len(frame) - HEADER_BYTES > limit:
            # Refused here, for this request alone: sent, it would make the broker close the
            # connection, failing every other request in flight on it (other threads' too).
            raise FrameTooLarge(
                f"request of {len(frame) - HEADER_BYTES} bytes is over the broker's frame limit "
                f"of {limit} bytes (tq broker --max-frame)"
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Response] = loop.create_future()
        self._pending[rid] = fut
        self._deadlines[rid] = loop.time() + timeout_s
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)
            self._silent_since = loop.time()  # silence counts from now, not from the last read
            self._reads_seen = self._reads
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self.poll.budget_ns and not (
            type(msg) is WaitTask or (type(msg) is ClaimTask and msg.wait_ms > 0)
        ):
            self._spin_rid = rid  # answered at once, not parked at the broker
        if len(self._pending) == 1 and not self._flush_scheduled:
            # Nothing else in flight or queued: a caller that waits for each reply in turn.
            # It goes now, as Nagle's rule sends when nothing is unacknowledged, instead of at
            # the end of the iteration: that pass of the loop cost every sequential submit
            # (alternating `tq bench` runs: p50 0.41 against 0.44 ms). Requests that follow it
            # in the same iteration still leave together.
            self._flush()
        elif self._out_bytes >= EARLY_FLUSH_BYTES:
            self._write_out()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """The end of the loop iteration: write what is queued."""
        self._flush_scheduled = False
        self._write_out()
        if self.poll.budget_ns and self._spin_rid in self._pending:
            self.poll.sent(alone=len(self._pending) == 1)

    def _reply_due(self) -> bool:
        """Is the polled-for reply still the one awaited, alone in flight?"""
        return len(self._pending) == 1 and self._spin_rid in self._pending and self.error is None

    def _write_out(self) -> None:
        self._out_bytes = 0
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            data = b"".join(out)
            self._written += len(data)
            self.transport.write(data)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
        for rid in expired:
            self._fail_request(rid, TimeoutError())
        if self.liveness_s:
            self._check_liveness(now)
        self._sweeper = loop.call_later(SWEEP_S, self._sweep) if self._deadlines else None

    def _unsent(self) -> int:
        """Bytes of ours the broker's kernel has not acknowledged yet (transport buffer, and
        the socket's send queue where the OS says)."""
        assert self.transport is not None
        unsent = self.transport.get_write_buffer_size()
        if self._fd >= 0:
            try:
                # SIOCOUTQ (= TIOCOUTQ): what the kernel holds, unsent or unacknowledged
                unsent += struct.unpack("i", fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                self._fd = -1  # not a socket that says (another OS): the buffer only
        return unsent

    def _check_liveness(self, now: float) -> None:
        # Silence is nothing read, and no upload moving: a request still going up a slow link
        # is progress (the ping queues behind it on the same stream: an 8 MB batch at 512 KB/s
        # was given up after 10 s). What a hung broker's kernel still takes is not: small
        # requests, and the ping itself, which on a link slower than a sweep is acknowledged
        # at the next one (it reset the silence at every probe, for ever). Only an upload of
        # at least UPLOAD_BYTES still queued counts.
        unsent = self._unsent() if self.transport is not None else 0
        acked = self._written - unsent
        uploading = max(unsent, self._unsent_seen) >= UPLOAD_BYTES
        moved = uploading and acked > self._acked_seen
        self._acked_seen, self._unsent_seen = acked, unsent
        if self._reads != self._reads_seen or moved:
            self._reads_seen = self._reads
            self._silent_since = now
            self._probe = None
        silent = now - self._silent_since
        waiting = len(self._pending) - (self._probe in self._pending)
        if not waiting or silent < self.liveness_s:
            return
        if self._probe is None:
            rid = self._probe = self.next_rid()
            try:
                probe = self.send(rid, Ping(rid), 2 * self.liveness_s)
            except TqError:
                return  # closing: connection_lost fails what is in flight
            probe.add_done_callback(_consume)
        elif silent >= 2 * self.liveness_s:
            error = Silent(f"answered nothing for {silent:.1f} s, not even a liveness probe")
            for rid in list(self._pending):
                self._fail_request(rid, error)
            self._probe = None
            self._silent_since = now

    def _fail_request(self, rid: int, error: BaseException) -> None:
        self._deadlines.pop(rid, None)
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def add_stream(self, rid: int, callback: Callable[[Response | TqError], None]) -> None:
        """Route every message for ``rid`` after its first reply to ``callback``."""
        self._streams[rid] = callback

    def remove_stream(self, rid: int) -> None:
        self._streams.pop(rid, None)

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)
        self._deadlines.pop(rid, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self, error: TqError | None = None) -> None:
        """Close at once, dropping whatever is still buffered for the broker. ``error`` (set now,
        not when ``connection_lost`` comes an iteration later, so that nobody sends on this
        connection meanwhile) is what the requests still in flight fail with."""
        if error is not None and self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def unread(self) -> bool:
        """Whether the socket holds input the event loop has not read: something the broker
        sent, or its close, while nobody ran the loop (the blocking ``Client`` between calls)."""
        if self.transport is None or self.error is not None:
            return False
        if self.transport.is_closing():
            return True  # read its end already, not yet told: let the loop get to connection_lost
        if self._fd < 0:
            return False
        try:
            ready, _, _ = select.select([self._fd], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile, or a number select cannot take
            return True  # let the loop look
        return bool(ready)


def _consume(fut: asyncio.Future[Response]) -> None:
    """A probe's answer is only ever looked at as bytes read: retrieve its outcome so that a
    failed one is not reported as never retrieved."""
    if not fut.cancelled():
        fut.exception()


def raise_for(msg: Response) -> Response:
    """Turn a NACK into the exception the broker raised."""
    if isinstance(msg, Nack):
        if msg.code == NotLeader.code:
            raise NotLeader(msg.message, leader=msg.leader)
        if msg.code == OutcomeUnknown.code:
            raise OutcomeUnknown(msg.message, leader=msg.leader)
        raise error_from_code(msg.code, msg.message)
    return msg
