"""The TCP face of the broker: one asyncio Protocol per connection, no streams.

Frames are parsed straight from ``data_received`` and replies for one tick are written with one
``write`` call. Everything a peer can send wrong ends in a NACK with a stable code (or, for a frame
that cannot be framed, a NACK and a clean close); nothing a peer sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

from tq.broker import commands as cmds
from tq.broker.commands import Cancel, Extend, RegisterWorker, Release, Report, Submit, WorkerLost
from tq.broker.core import BrokerCore
from tq.broker.log import LocalLog
from tq.errors import (
    BadRequest,
    FrameTooLarge,
    LeaseLost,
    NotLeader,
    PayloadTooLarge,
    TaskNotFound,
    TqError,
    Unauthenticated,
    UnsupportedVersion,
)
from tq.logfields import kv
from tq.model import MAX_PAYLOAD_BYTES, Task, TaskState, valid_name, valid_task_id
from tq.protocol.codec import decode_request, encode, guess_rid
from tq.protocol.framing import FrameDecoder
from tq.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    CancelTask,
    ClaimTask,
    ClusterChange,
    DeadLetters,
    ExportReply,
    ExportTasks,
    GetStats,
    Heartbeat,
    Hello,
    Leased,
    ListTasks,
    Nack,
    PauseQueue,
    Ping,
    Progress,
    QueryStatus,
    ReleaseTasks,
    ResultBatch,
    StatsReply,
    SubmitBatch,
    SubmitTask,
    TaskInfoReply,
    TaskListReply,
    TaskResult,
    TaskSpec,
    Unwait,
    Unwatch,
    WaitTask,
    Watch,
    Welcome,
)

log = logging.getLogger("tq.broker.tcp")

MAX_BATCH = 100_000
MAX_CLAIM = 10_000
MAX_LIST = 10_000
MAX_EXPORT_PAGE = 50_000
MAX_WATCHES = 8  # per connection
# Requests the broker holds open for a connection: each costs memory (~2.4 KB a wait) and every
# parked claim is looked at when a task becomes ready, so a peer must not open them without end.
MAX_OPEN_CLAIMS = 16  # per connection; a worker has one open at a time
MAX_OPEN_WAITS = 10_000  # per connection
# Replies queued for a peer that does not read them: reading from it stops above the transport's
# high-water mark; what requests already read still produce is capped here (the connection is
# closed), as a 17-byte status request can ask for a 10 MiB reply.
WRITE_HIGH_WATER = 1024 * 1024
MAX_FRAMES_PER_TURN = 1000  # frames of one peer handled before the loop turns to the others
WATCH_SNDBUF = 128 * 1024


_known_names: set[str] = set()


def _name_ok(name: str) -> bool:
    """Names repeat endlessly: remember the valid ones (bounded) instead of re-running a regex."""
    if name in _known_names:
        return True
    if not valid_name(name):
        return False
    if len(_known_names) < 10_000:
        _known_names.add(name)
    return True


# The limits of a task spec: validate_spec and validate_specs must agree, so they share them.
MAX_ID_LEN = 64
MAX_RETRIES = 1000
MAX_TIMEOUT_S = 7 * 86400.0
MAX_BACKOFF_S = 86400.0
_PRIORITIES = frozenset((0, 1, 2))
_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"


def validate_spec(spec: TaskSpec) -> None:
    """The one definition of a valid task spec (TCP and HTTP), with a message naming the field."""
    tid = spec.id
    if not (0 < len(tid) <= MAX_ID_LEN and tid.isascii() and tid.isalnum()) and not (
        valid_task_id(tid)
    ):
        raise BadRequest(f"task id {spec.id[:80]!r} must be 1-64 of [A-Za-z0-9_.:-]")
    if not _name_ok(spec.name):
        raise BadRequest(f"task name {spec.name[:80]!r} must be 1-200 of [A-Za-z0-9_.:-]")
    if not _name_ok(spec.queue):
        raise BadRequest(f"queue {spec.queue[:80]!r} must be 1-200 of [A-Za-z0-9_.:-]")
    if spec.priority not in _PRIORITIES:
        raise BadRequest("priority must be 0 (high), 1 (normal) or 2 (low)")
    if len(spec.payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload of {len(spec.payload)} bytes exceeds {MAX_PAYLOAD_BYTES} bytes"
        )
    if not 0 <= spec.max_retries <= MAX_RETRIES:
        raise BadRequest(f"max_retries must be between 0 and {MAX_RETRIES}")
    if not 0 < spec.timeout_s <= MAX_TIMEOUT_S:
        raise BadRequest("timeout_s must be > 0 and at most 7 days")
    if not 0 <= spec.backoff_s <= MAX_BACKOFF_S:
        raise BadRequest(f"backoff_s must be between 0 and {MAX_BACKOFF_S:.0f}")


def validate_specs(specs: list[TaskSpec]) -> None:
    """``validate_spec`` for a whole batch, field by field with C-level loops (comprehensions,
    min/max, sets, ``bytes.translate``): half the cost of checking spec by spec, which was a fifth
    of the broker's CPU per batched task. Only a batch that fails is walked spec by spec, to name
    the first bad task and say why (tests/broker/test_validate.py holds the two to one answer)."""
    ids = [s.id for s in specs]
    lengths = [len(i) for i in ids]
    joined = "".join(ids)
    retries = [s.max_retries for s in specs]
    timeouts = [s.timeout_s for s in specs]
    backoffs = [s.backoff_s for s in specs]
    total = sum(timeouts) + sum(backoffs)  # NaN anywhere makes this NaN (min/max may skip it)
    ok = (
        total == total
        and joined.isascii()
        and not joined.encode().translate(None, _ID_CHARS)
        and min(lengths) > 0
        and max(lengths) <= MAX_ID_LEN
        and all(map(_name_ok, {s.name for s in specs}))
        and all(map(_name_ok, {s.queue for s in specs}))
        and {s.priority for s in specs} <= _PRIORITIES
        and max([len(s.payload) for s in specs]) <= MAX_PAYLOAD_BYTES
        and min(retries) >= 0
        and max(retries) <= MAX_RETRIES
        and min(timeouts) > 0
        and max(timeouts) <= MAX_TIMEOUT_S
        and min(backoffs) >= 0
        and max(backoffs) <= MAX_BACKOFF_S
    )
    if ok:
        return
    for i, spec in enumerate(specs):
        try:
            validate_spec(spec)
        except TqError as exc:
            raise type(exc)(f"task {i}: {exc.message}") from None


def _validate_queues(queues: list[str]) -> None:
    if not queues or len(queues) > 100 or not all(valid_name(q) for q in queues):
        raise BadRequest("queues must be 1-100 valid queue names")


def _validate_worker_hello(msg: Hello) -> None:
    """What a worker says about itself is stored and shown to everybody (``tq workers``, the
    stats every ``tq top`` polls): a 9 MiB host name made every stats reply too big to send."""
    if not valid_task_id(msg.client_id):
        raise BadRequest("a worker must send a client_id of 1-64 of [A-Za-z0-9_.:-]")
    if len(msg.host) > 255 or not msg.host.isprintable():
        raise BadRequest("host must be at most 255 printable characters")
    if msg.queues:
        _validate_queues(msg.queues)
    if not 0 <= msg.pid < 2**32 or not 0 <= msg.concurrency <= 1_000_000:
        raise BadRequest("pid and concurrency must be non-negative and in range")


class Connection(asyncio.Protocol):
    def __init__(self, core: BrokerCore, server: TcpServer) -> None:
        self.core = core
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(core.config.max_frame_bytes)
        self.hello: Hello | None = None
        self.worker_id: str | None = None
        self.closed = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self.peer = ""
        self._hello_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_blocked = False  # the peer reads slower than we answer (pause_writing)
        # Frames read but not handled yet: a turn handles at most MAX_FRAMES_PER_TURN of them,
        # and none while this peer's replies back up; reading waits until they are done.
        self._unhandled: collections.deque[bytes] = collections.deque()
        self._turn_scheduled = False
        self._open: dict[str, int] = {"claims": 0, "waits": 0}  # requests held, see _held
        self._waits: dict[int, Callable[[], None]] = {}  # rid -> ends that wait, for unwait
        # Well above what a client that reads promptly queues in one tick (seven concurrent
        # status calls of 10 MiB tasks crossed 64 MiB), and it bounds a hostile one's memory.
        self._max_backlog = max(256 * 1024 * 1024, 8 * core.config.max_frame_bytes)
        self._fd = -1
        self.pace = server.spinner.pace()  # does this peer answer a reply quickly (tq/spin.py)
        self.asked = False  # it sent something since its replies last left

    # --- transport callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if not self.server.admit(self):
            self.closed = True
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._fd = _fileno(transport)
        self.server.spinner.add(self._fd, self)
        # A peer that never says hello holds a file descriptor for nothing: 200 such sockets
        # slowed nobody, but enough of them would leave the broker unable to accept.
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.core.config.hello_timeout_s, self._no_hello
        )

    def _no_hello(self) -> None:
        if self.hello is None and not self.closed and self.transport is not None:
            log.info(
                "tcp.no_hello_closed",
                extra=kv(peer=self.peer, after_s=self.core.config.hello_timeout_s),
            )
            self.closed = True
            self.transport.abort()

    def pause_writing(self) -> None:
        """The peer reads slower than we answer: stop reading its requests until it catches up
        (a client that never reads made the broker buffer replies without limit). Not on a
        connection with watches: the watch hub keeps up to 4 MiB of updates queued for a slow
        watcher by design, so reading would never resume and ``tq top``'s requests on that
        connection would wait for ever; the backlog cap still bounds it."""
        if self.transport is not None and not self.closed and not self.core.watch.owned_by(self):
            self._writing_blocked = True
            self._update_reading()

    def resume_writing(self) -> None:
        self._writing_blocked = False
        if self._unhandled:
            self._schedule_turn()
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        """Read from the peer only while its replies flow and its last read is handled."""
        if self.transport is None or self.closed:
            return
        pause = self._writing_blocked or bool(self._unhandled)
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.server.connections.discard(self)
        self.server.spinner.discard(self._fd, self)
        self.core.drop_parked(self)
        self.core.drop_waits(self)
        self.core.watch.unsubscribe(self)
        if self.worker_id is not None and not self.server.worker_connected(self.worker_id):
            log.info("worker.disconnected", extra=kv(worker=self.worker_id))
            self.core.submit(WorkerLost(self.worker_id), None)

    def data_received(self, data: bytes) -> None:
        if self.server.spinner.enabled:
            self.pace.arrived(time.monotonic_ns())
            self.asked = True
        try:
            frames = self.decoder.feed(data)
        except FrameTooLarge as exc:
            self._send(Nack(0, exc.code, exc.message))
            self._close_after_flush()
            return
        self._unhandled.extend(frames)
        self._turn()

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """Handle this peer's frames, a bounded number at a time. One read of 512 Ki tiny
        frames held the loop for seconds, every other client waiting; and requests whose
        replies a peer never reads (24 ``status`` calls of a 10 MB task in one write, from four
        connections) held a gigabyte of replies. Now a turn ends after MAX_FRAMES_PER_TURN
        frames (the rest wait for the next loop iteration, other peers' work first) or once
        this peer's unsent replies pass WRITE_HIGH_WATER; while frames wait, or its replies back
        up in the transport (pause_writing), its socket is not read."""
        self._turn_scheduled = False
        frames = self._unhandled
        handled = 0
        while frames and not self.closed:
            if self._writing_blocked:
                break  # resume_writing takes it up again
            if handled >= MAX_FRAMES_PER_TURN or self._out_bytes > WRITE_HIGH_WATER:
                self._schedule_turn()  # after this iteration's flush
                break
            self._handle_frame(frames.popleft())
            handled += 1
        if self.closed:
            frames.clear()
            return
        self._update_reading()
        if not frames and self.decoder.failed:
            self.data_received(b"")  # the oversized frame that followed them: NACK and close

    def _handle_frame(self, body: bytes) -> None:
        try:
            msg = decode_request(body)
        except TqError as exc:  # ProtocolError included
            self._send(Nack(guess_rid(body), exc.code, exc.message))
            return
        try:
            self._dispatch(msg)
        except TqError as exc:
            self._send(_nack(msg.rid, exc))
        except Exception as exc:  # a bug must cost one request, never the broker
            log.exception("tcp.handler_failed")
            self._send(Nack(msg.rid, "INTERNAL", f"internal error: {type(exc).__name__}"))

    # --- output ----------------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        if self.closed:
            return
        frame = encode(msg)
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes > self._max_backlog and self.transport is not None:
            # before the next flush (which checks the transport's buffer too): one read of
            # small requests can ask for gigabytes
            self._abort_slow_reader()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.server.want_flush(self)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.transport is None or not self._out:
            self._out.clear()
            return
        out, self._out = self._out, []
        self._out_bytes = 0
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self.transport.get_write_buffer_size() > self._max_backlog:
            self._abort_slow_reader()

    def _abort_slow_reader(self) -> None:
        assert self.transport is not None
        log.warning(
            "tcp.slow_reader_closed",
            extra=kv(
                peer=self.peer,
                backlog_bytes=self._out_bytes + self.transport.get_write_buffer_size(),
                limit_bytes=self._max_backlog,
            ),
        )
        self._out.clear()
        self._out_bytes = 0
        self.closed = True
        self.transport.abort()

    def _close_after_flush(self) -> None:
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _after_durable(self, rid: int, fn: Callable[[], None], leader_only: bool = True) -> None:
        """Run the rest of request ``rid`` once what is applied is durable, as ``_handle_frames``
        runs its first part: an error is that request's NACK, never an exception in the commit
        path (where it once cost every later reply of the commit). A leader-only read checks
        again that this node serves: behind a write it may run after the node stepped down,
        and a follower's state would answer it wrongly."""

        def run() -> None:
            if leader_only:
                self._require_serving()
            fn()

        self.core.after_durable(lambda: self._guarded(rid, run))

    def _guarded(self, rid: int, fn: Callable[[], None]) -> None:
        try:
            fn()
        except TqError as exc:
            self._send(_nack(rid, exc))
        except Exception as exc:  # a bug must cost one request, never the broker
            log.exception("tcp.handler_failed")
            self._send(Nack(rid, "INTERNAL", f"internal error: {type(exc).__name__}"))

    def _replier(self, rid: int, build: Any) -> Any:
        """A reply callback: TqError values become NACKs, anything else goes through ``build``."""

        def reply(value: Any) -> None:
            if isinstance(value, TqError):
                self._send(_nack(rid, value))
            else:
                self._send(build(value))

        return reply

    def _held(self, what: str, limit: int, build: Any, rid: int) -> Callable[[Any], None]:
        """The reply callback of a request the broker holds open (a parked claim, a wait):
        each costs memory and work until answered, so at most ``limit`` of a kind at once."""
        if self._open[what] >= limit:
            raise BadRequest(f"at most {limit} {what} open per connection")
        self._open[what] += 1
        reply = self._replier(rid, build)

        def answer(value: Any) -> None:
            self._open[what] -= 1
            reply(value)

        return answer

    # --- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, msg: Any) -> None:
        if self.hello is None and not isinstance(msg, Hello):
            raise BadRequest("the first message on a connection must be hello")
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            raise BadRequest(f"{type(msg).__name__} is not a request")
        handler(self, msg)

    def _on_submit(self, msg: SubmitTask) -> None:
        validate_spec(msg.task)
        rid = msg.rid
        self.core.submit(Submit([msg.task]), self._replier(rid, lambda r: Ack(rid, r[0], r[1])))

    def _on_submit_batch(self, msg: SubmitBatch) -> None:
        rid, specs = msg.rid, msg.tasks
        if not 0 < len(specs) <= MAX_BATCH:
            raise BadRequest(f"a batch holds 1 to {MAX_BATCH} tasks")
        validate_specs(specs)
        self.core.submit(Submit(specs), self._replier(rid, lambda r: Ack(rid, r[0], r[1])))

    def _on_claim(self, msg: ClaimTask) -> None:
        worker_id = self._require_worker()
        _validate_queues(msg.queues)
        if not 0 < msg.max <= MAX_CLAIM:
            raise BadRequest(f"max must be 1 to {MAX_CLAIM}")
        rid = msg.rid
        answer = self._held("claims", MAX_OPEN_CLAIMS, lambda tasks: Leased(rid, tasks), rid)
        self.core.claim(
            worker_id,
            msg.queues,
            msg.max,
            min(max(msg.wait_ms, 0), 300_000),
            answer,
            self,
        )

    def _on_result(self, msg: TaskResult) -> None:
        self._report(msg.rid, [msg.outcome])

    def _on_result_batch(self, msg: ResultBatch) -> None:
        self._report(msg.rid, msg.outcomes)

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        worker_id = self._require_worker()
        cpu, rss = msg.cpu_percent, msg.rss_bytes
        if not (0 <= cpu <= 100_000 and 0 <= rss < 1 << 53):
            # Dropped, not refused: the leases must still be extended. Stored, a NaN would make
            # `tq workers -o json` and /api/v1/workers invalid JSON.
            cpu, rss = 0.0, 0
        self.core.worker_metrics[worker_id] = {"cpu_percent": cpu, "rss_bytes": rss}
        rid = msg.rid
        self.core.submit(
            Extend(worker_id, msg.leases), self._replier(rid, lambda r: Ack(rid, [], r))
        )

    def _on_release(self, msg: ReleaseTasks) -> None:
        worker_id = self._require_worker()
        # Only a stopping worker releases. Its claim still parked here would be handed the very
        # tasks it gives back, and they would be requeued again (attempt counted) when it
        # leaves a moment later: so that claim ends now, empty.
        self.core.drop_parked(self, answer=True)
        rid = msg.rid
        self.core.submit(
            Release(worker_id, msg.leases), self._replier(rid, lambda r: Ack(rid, [], r))
        )

    def _require_serving(self) -> None:
        if not self.core.serving:
            raise self.core.refusal()

    def _on_ping(self, msg: Ping) -> None:
        self._send(Ack(msg.rid))  # from the loop itself: an answer says the loop is alive

    def _on_status(self, msg: QueryStatus) -> None:
        self._require_serving()
        self._after_durable(msg.rid, lambda: self._status(msg.rid, msg.task_id))

    def _on_wait(self, msg: WaitTask) -> None:
        rid = msg.rid
        answer = self._held("waits", MAX_OPEN_WAITS, lambda t: TaskInfoReply(rid, t), rid)
        withdrawn = False

        def reply(value: Any) -> None:
            self._waits.pop(rid, None)
            if withdrawn:  # its answer was on its way when the client withdrew it: not sent
                self._open["waits"] -= 1
            else:
                answer(value)

        end = self.core.wait(msg.task_id, msg.timeout_ms, reply, self)
        if end is not None:

            def withdraw() -> None:
                # A wait that started behind a write and found its task final has its answer
                # on the way, which end() cannot stop: that answer uncounts it, unsent. Both
                # used to uncount it (the cap drifted below what was open), and the client got
                # an answer after the acknowledgement of its unwait.
                nonlocal withdrawn
                withdrawn = True
                if end():
                    self._open["waits"] -= 1

            self._waits[rid] = withdraw

    def _on_unwait(self, msg: Unwait) -> None:
        """Always acknowledged: the wait may have been answered while this was on its way."""
        withdraw = self._waits.pop(msg.wait_rid, None)
        if withdraw is not None:
            withdraw()
        self._send(Ack(msg.rid))

    def _on_list(self, msg: ListTasks) -> None:
        self._require_serving()
        self._after_durable(msg.rid, lambda: self._list(msg))

    def _on_cancel(self, msg: CancelTask) -> None:
        rid = msg.rid
        self.core.submit(Cancel(msg.task_id), self._replier(rid, lambda t: TaskInfoReply(rid, t)))

    def _on_stats(self, msg: GetStats) -> None:
        # Any node answers (a follower from its local state): `tq cluster status` needs it.
        rid = msg.rid
        self._after_durable(
            rid, lambda: self._send(StatsReply(rid, self.core.stats())), leader_only=False
        )

    def _on_pause(self, msg: PauseQueue) -> None:
        if not valid_name(msg.queue):
            raise BadRequest(f"queue {msg.queue[:80]!r} must be 1-200 of [A-Za-z0-9_.:-]")
        rid = msg.rid
        self.core.submit(
            cmds.PauseQueue(msg.queue, msg.paused),
            self._replier(rid, lambda _: Ack(rid, [msg.queue])),
        )

    def _on_dead_letters(self, msg: DeadLetters) -> None:
        self._require_serving()
        if msg.op not in ("list", "retry", "purge"):
            raise BadRequest("op must be list, retry or purge")
        if not 0 < msg.limit <= MAX_LIST:
            raise BadRequest(f"limit must be 1 to {MAX_LIST}")
        self._after_durable(msg.rid, lambda: self._dead_letters(msg))

    def _dead_letters(self, msg: DeadLetters) -> None:
        rid = msg.rid
        tasks = self.core.select_dead(
            msg.task_ids,
            queue=msg.queue,
            name=msg.name,
            error_type=msg.error_type,
            older_than_s=msg.older_than_s,
            limit=msg.limit,
            after=msg.after if msg.op == "list" else None,
        )
        if msg.op == "list":
            page, cursor = _fit(tasks, msg.limit, self.core.config.max_frame_bytes // 2)
            self._send(TaskListReply(rid, page, cursor))
            return
        ids = [t.id for t in tasks]
        if msg.dry_run or not ids:
            self._send(Ack(rid, ids))
            return
        command = cmds.RetryDead(ids) if msg.op == "retry" else cmds.PurgeDead(ids)
        self.core.submit(command, self._replier(rid, lambda done: Ack(rid, done)))

    def _on_watch(self, msg: Watch) -> None:
        self._require_serving()
        watching = self.core.watch.owned_by(self)
        if watching >= MAX_WATCHES:
            raise BadRequest(f"at most {MAX_WATCHES} watches per connection")
        if not watching and self.transport is not None:
            # A fixed send buffer (no autotuning up to 4 MB): a stalled watcher is noticed after
            # a few hundred KB, and then gets snapshots only (tq/broker/watch.py).
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WATCH_SNDBUF)
        self._send(Ack(msg.rid))
        self._flush()  # the ACK goes before the first update
        self.core.watch.subscribe(
            self,
            msg.rid,
            events=msg.events,
            interval_ms=msg.interval_ms,
            write=self._write_raw,
            backlog=self._backlog,
        )

    def _on_unwatch(self, msg: Unwatch) -> None:
        self.core.watch.unsubscribe(self, msg.watch_rid)
        self._send(Ack(msg.rid))

    def _write_raw(self, frame: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(frame)

    def _backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _on_progress(self, msg: Progress) -> None:
        worker_id = self._require_worker()
        lease = self.core.sm.leases.get(msg.task_id)
        if lease is None or lease.token != msg.token or lease.worker_id != worker_id:
            raise LeaseLost(f"no lease on {msg.task_id} with that token")
        if not (0.0 <= msg.fraction <= 1.0 or msg.fraction == -1.0) or len(msg.message) > 1000:
            raise BadRequest("fraction must be 0..1 (or -1 for none), message at most 1000 chars")
        self.core.watch.progress(msg.task_id, msg.fraction, msg.message)
        self._send(Ack(msg.rid))

    def _on_export(self, msg: ExportTasks) -> None:
        self._require_serving()
        if not 0 < msg.limit <= MAX_EXPORT_PAGE:
            raise BadRequest(f"limit must be 1 to {MAX_EXPORT_PAGE}")
        states: list[TaskState] = []
        for name in msg.states:
            try:
                state = TaskState(name)
            except ValueError:
                raise BadRequest(f"unknown state {name[:40]!r}") from None
            if state in (TaskState.PENDING, TaskState.RUNNING):
                raise BadRequest("export covers finished tasks: completed, failed, dead, cancelled")
            if state not in states:
                states.append(state)
        if not states:
            raise BadRequest("states must name at least one state")
        if msg.since_ms < 0 or msg.until_ms < 0:
            raise BadRequest("since_ms and until_ms must be >= 0")
        self._after_durable(msg.rid, lambda: self._export(msg, states))

    def _export(self, msg: ExportTasks, states: list[TaskState]) -> None:
        try:
            rows, cursor = self.core.sm.history_page(
                states,
                msg.queue,
                msg.since_ms,
                msg.until_ms,
                msg.limit,
                msg.after,
                max_bytes=self.core.config.max_frame_bytes // 2,
            )
        except ValueError:
            self._send(Nack(msg.rid, BadRequest.code, "bad cursor"))
            return
        self._send(ExportReply(msg.rid, rows, cursor))

    def _on_cluster_change(self, msg: ClusterChange) -> None:
        if msg.op not in ("add", "remove"):
            raise BadRequest("op must be add or remove")
        host, sep, port = msg.address.rpartition(":")
        # A bad port used to pass: the phantom member could never answer, and a 3-node cluster
        # then needed 3 of 4 votes, so losing one real node stopped it.
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536
        ):
            raise BadRequest(f"{msg.address[:80]!r} is not host:port (port 1-65535)")
        if not host.isprintable() or any(c.isspace() for c in host):
            raise BadRequest(f"{msg.address[:80]!r}: bad host name")
        rid = msg.rid
        self.core.cluster_change(msg.op, msg.address, self._replier(rid, lambda _: Ack(rid)))

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            self._send(
                Nack(
                    msg.rid,
                    UnsupportedVersion.code,
                    f"protocol version {msg.version} is not supported (broker speaks "
                    f"{PROTOCOL_VERSION})",
                )
            )
            self._close_after_flush()
            return
        token = self.core.config.auth_token
        if token is not None and not hmac.compare_digest(
            (msg.token or "").encode(), token.encode()
        ):
            self._send(Nack(msg.rid, Unauthenticated.code, "bad or missing auth token"))
            self._close_after_flush()
            return
        if self.hello is not None:
            raise BadRequest("hello was already received on this connection")
        if msg.role == "worker":
            _validate_worker_hello(msg)
        self.hello = msg
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if msg.role == "worker":
            self.worker_id = msg.client_id
            log.info("worker.connected", extra=kv(worker=msg.client_id, host=msg.host, pid=msg.pid))
            self.core.submit(
                RegisterWorker(msg.client_id, msg.host, msg.pid, msg.concurrency, msg.queues),
                None,
            )
        config = self.core.config
        self._send(
            Welcome(
                msg.rid,
                PROTOCOL_VERSION,
                self.core.node_id,
                heartbeat_timeout_ms=int(config.heartbeat_timeout_s * 1000),
                lease_ms=int(config.lease_s * 1000),
                max_frame_bytes=config.max_frame_bytes,
            )
        )

    def _require_worker(self) -> str:
        if self.worker_id is None:
            raise BadRequest("only a connection that said hello as a worker may do this")
        return self.worker_id

    def _report(self, rid: int, outcomes: list[Any]) -> None:
        worker_id = self._require_worker()
        if len(outcomes) > MAX_CLAIM:
            raise BadRequest(f"a result batch holds at most {MAX_CLAIM} outcomes")
        for outcome in outcomes:
            if outcome.result is not None and len(outcome.result) > MAX_PAYLOAD_BYTES:
                self._report_some(rid, worker_id, outcomes)
                return
        self.core.submit(Report(worker_id, outcomes), self._replier(rid, lambda r: Ack(rid, *r)))

    def _report_some(self, rid: int, worker_id: str, outcomes: list[Any]) -> None:
        """A report holding results over ``MAX_PAYLOAD_BYTES``: those alone are refused, as
        ``PAYLOAD_TOO_LARGE`` in ``Ack.rejected``, and the others applied. Refusing the whole
        batch refused every other result in it, and (as a worker resends what it could not
        report, with whatever finished since) every result of that worker from then on. The
        leases of the refused ones end as any unreported lease does (requeued when the worker's
        heartbeats stop listing them, or when the lease expires)."""
        kept: list[Any] = []
        refused: list[tuple[str, str]] = []
        for outcome in outcomes:
            if outcome.result is not None and len(outcome.result) > MAX_PAYLOAD_BYTES:
                refused.append((outcome.task_id, PayloadTooLarge.code))
            else:
                kept.append(outcome)
        log.warning(
            "tcp.results_too_large",
            extra=kv(worker=worker_id, tasks=len(refused), limit=MAX_PAYLOAD_BYTES),
        )
        if not kept:
            self._send(Ack(rid, [], refused))
            return
        self.core.submit(
            Report(worker_id, kept),
            self._replier(rid, lambda r: Ack(rid, r[0], [*refused, *r[1]])),
        )

    def _status(self, rid: int, task_id: str) -> None:
        task: Task | None = self.core.sm.get_task(task_id)
        if task is None:
            self._send(Nack(rid, TaskNotFound.code, f"no task {task_id[:80]}"))
        else:
            self._send(TaskInfoReply(rid, task))

    def _list(self, msg: ListTasks) -> None:
        try:
            state = TaskState(msg.state)
        except ValueError:
            self._send(Nack(msg.rid, BadRequest.code, f"unknown state {msg.state!r}"))
            return
        if not 0 < msg.limit <= MAX_LIST:
            self._send(Nack(msg.rid, BadRequest.code, f"limit must be 1 to {MAX_LIST}"))
            return
        try:
            tasks, cursor = self.core.sm.list_tasks(
                state,
                msg.queue,
                msg.name,
                msg.limit,
                msg.after,
                max_bytes=self.core.config.max_frame_bytes // 2,
            )
        except ValueError:
            self._send(Nack(msg.rid, BadRequest.code, "bad cursor"))
            return
        self._send(TaskListReply(msg.rid, tasks, cursor))


_HANDLERS: dict[type[Any], Callable[[Connection, Any], None]] = {
    Hello: Connection._on_hello,
    SubmitTask: Connection._on_submit,
    SubmitBatch: Connection._on_submit_batch,
    ClaimTask: Connection._on_claim,
    TaskResult: Connection._on_result,
    ResultBatch: Connection._on_result_batch,
    Heartbeat: Connection._on_heartbeat,
    ReleaseTasks: Connection._on_release,
    QueryStatus: Connection._on_status,
    WaitTask: Connection._on_wait,
    Unwait: Connection._on_unwait,
    ListTasks: Connection._on_list,
    CancelTask: Connection._on_cancel,
    GetStats: Connection._on_stats,
    ClusterChange: Connection._on_cluster_change,
    PauseQueue: Connection._on_pause,
    DeadLetters: Connection._on_dead_letters,
    Watch: Connection._on_watch,
    Unwatch: Connection._on_unwatch,
    Progress: Connection._on_progress,
    ExportTasks: Connection._on_export,
    Ping: Connection._on_ping,
}


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen here rather than inside ``create_server``: uvloop reports a failed
    ``listen()`` only to the loop's exception handler and hands back a closed server, so the real
    error (EADDRINUSE at listen time, e.g. two brokers racing for one default port) would surface
    as a confusing ``'NoneType' object has no attribute 'getsockname'``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _fit(tasks: list[Task], limit: int, max_bytes: int) -> tuple[list[Task], str | None]:
    """A dead-letter list that fits in one reply: no payloads (a list by filters comes without
    them already; tasks named by id come whole from the store), and it ends once results and
    errors reach ``max_bytes`` (after at least one task), with the last id returned as the
    cursor, as ``list_tasks`` pages: without payloads, the tracebacks of a few hundred dead tasks
    (up to 64 Ki characters each from a worker) still make a reply over the frame limit. A page
    ``limit`` filled has a cursor too."""
    out: list[Task] = []
    size = 0
    for task in tasks:
        out.append(msgspec.structs.replace(task, payload=b"") if task.payload else task)
        size += 256 + len(task.result or b"")
        if task.error is not None:
            size += len(task.error.message) + len(task.error.traceback)
        if size >= max_bytes and len(out) < len(tasks):
            return out, task.id
    return out, (out[-1].id if out and len(out) >= limit else None)


FD_RESERVE = 256  # descriptors kept for the store (SST and WAL files), HTTP, SSH and Raft


def _fileno(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


def connection_limit() -> int:
    """How many TCP connections the broker takes: its file descriptor limit, raised to the hard
    limit first (the usual soft 1,024 is a default, not a decision), less ``FD_RESERVE``."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except (ValueError, OSError):
        return 1024 - FD_RESERVE
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, soft - FD_RESERVE)


def _nack(rid: int, exc: TqError) -> Nack:
    return Nack(rid, exc.code, exc.message, exc.leader if isinstance(exc, NotLeader) else None)


class TcpServer:
    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        core.on_worker_lost = self.close_worker
        core.on_replies = self.flush
        self.connections: set[Connection] = set()
        self.max_connections = core.config.max_connections or connection_limit()
        self.refused = 0  # connections closed at once for being over max_connections
        self._refused_logged = 0.0
        self._dirty: list[Connection] = []  # connections with replies queued
        self._flush_scheduled = False
        self._server: asyncio.Server | None = None
        self.port = 0
        self.spinner = core.spinner  # polls the connections before the loop sleeps
        self._spin_scheduled = False
        self._polled_for: list[Connection] = []  # the quick peers the next poll is for

    def admit(self, conn: Connection) -> bool:
        """Take a new connection unless ``max_connections`` are open: the descriptors left are
        the store's. 1,100 idle sockets under ``ulimit -n 1024`` left RocksDB unable to open its
        next WAL file, and the broker stopped (a failed store write is fatal)."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged >= 10:  # a flood must not flood the log too
                self._refused_logged = now
                log.warning(
                    "tcp.too_many_connections",
                    extra=kv(open=len(self.connections), refused=self.refused, peer=conn.peer),
                )
            return False
        self.connections.add(conn)
        return True

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        sock = listening_socket(host, port)
        self._server = await loop.create_server(lambda: Connection(self.core, self), sock=sock)
        self.port = int(sock.getsockname()[1])
        return self.port

    def want_flush(self, conn: Connection) -> None:
        """Queue ``conn`` for the end of this loop iteration: the replies of one iteration leave
        in one write per connection."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write every queued reply now. The core calls this once a commit's replies are queued,
        so they leave right after the durable write instead of one loop iteration later (one
        ``epoll_wait`` and a pass over the loop, a few microseconds of every submit's latency)."""
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn._flush()
        if self.spinner.enabled:
            self._expect(dirty)

    def _expect(self, answered: list[Connection]) -> None:
        """Replies have left: poll for the next request if a peer just answered is one that
        answers quickly. Only peers that asked something count (a watch's updates, say, are
        not answers), and each is judged by its own pace: many slow clients together send
        often, but none of them answers its reply within the budget."""
        now = time.monotonic_ns()
        for conn in answered:
            if conn.asked:
                conn.asked = False
                conn.pace.waiting(now)
                if conn.pace.quick:
                    self._polled_for.append(conn)
        if self._polled_for and not self._spin_scheduled:
            self._spin_scheduled = True
            asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        """Poll for the next request (after the callbacks already due), unless the writer
        thread has a write whose end a poll of the sockets would not see."""
        self._spin_scheduled = False
        polled_for, self._polled_for = self._polled_for, []
        log_ = self.core.log
        if not (isinstance(log_, LocalLog) and log_.threads_idle) or self.core.closing:
            return
        if self.spinner.spin() is False:
            for conn in polled_for:
                conn.pace.missed()

    def close_worker(self, worker_id: str) -> None:
        """The state machine declared this worker lost: end its connections (unless it has
        registered again since, in the same batch, over a new connection)."""
        if worker_id in self.core.sm.workers:
            return
        for conn in list(self.connections):
            if conn.worker_id == worker_id:
                # Still connected, so it was declared lost for its silence (a closed connection
                # reports itself): say so, since the worker will only see a reset and reconnect.
                log.warning(
                    "worker.lost",
                    extra=kv(
                        worker=worker_id,
                        why="silent longer than the heartbeat timeout: its connection is closed "
                        "and its leases requeued",
                        heartbeat_timeout_s=self.core.config.heartbeat_timeout_s,
                    ),
                )
                conn.worker_id = None  # already lost: closing must not report it again
                conn._close_after_flush()

    def worker_connected(self, worker_id: str) -> bool:
        return any(c.worker_id == worker_id and not c.closed for c in self.connections)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn._close_after_flush()
