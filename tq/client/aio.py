"""``AsyncClient``: the one implementation of talking to a broker (the sync ``Client`` drives it).

It keeps one multiplexed connection, reconnects with exponential backoff, follows NOT_LEADER to
the address the broker names, and retries requests that are safe to repeat (submits carry their
task ids, so a resubmit after a lost connection cannot create a second task).
"""

from __future__ import annotations

import asyncio
import builtins
import math
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from tq.client.connection import LIVENESS_S, Connection, raise_for
from tq.client.values import decode_value, encode_payload
from tq.config import (
    DEFAULT_FRAME_LIMIT,
    MAX_WAIT_S,
    auth_token_from_env,
    broker_url_from_env,
    connect_timeout_from_env,
    parse_broker_url,
)
from tq.errors import (
    BadRequest,
    BrokerUnavailable,
    NotLeader,
    OutcomeUnknown,
    TqError,
    Unauthenticated,
    UnsupportedVersion,
)
from tq.model import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    ErrorInfo,
    Priority,
    Task,
    new_ids,
)
from tq.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    CancelTask,
    DeadLetters,
    ExportReply,
    ExportTasks,
    GetStats,
    Hello,
    HistoryRow,
    ListTasks,
    PauseQueue,
    Progress,
    QueryStatus,
    Response,
    StatsReply,
    SubmitBatch,
    SubmitTask,
    TaskInfoReply,
    TaskListReply,
    TaskSpec,
    Unwait,
    Unwatch,
    WaitTask,
    Watch,
    WatchUpdate,
    Welcome,
)
from tq.spin import CLIENT_SPIN_US, MAX_CLIENT_SPIN_US

R = TypeVar("R", bound=Response)
CLOSE_WAIT_S = 1.0  # how long close() lets a connection finish closing before aborting it
MIN_ATTEMPT_S = 0.5  # the least each address gets to connect and answer hello


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What a producer sees of a task. ``result`` is the handler's return value, decoded."""

    id: str
    name: str
    queue: str
    priority: str
    state: str
    attempt: int
    max_retries: int
    timeout_s: float
    submitted_at_ms: int
    started_at_ms: int
    finished_at_ms: int
    eta_ms: int
    worker_id: str
    result: Any
    error: ErrorInfo | None
    payload: Any

    @classmethod
    def from_task(cls, task: Task) -> TaskInfo:
        return cls(
            id=task.id,
            name=task.name,
            queue=task.queue,
            priority=Priority(task.priority).label,
            state=task.state,
            attempt=task.attempt,
            max_retries=task.max_retries,
            timeout_s=task.timeout_s,
            submitted_at_ms=task.submitted_at_ms,
            started_at_ms=task.started_at_ms,
            finished_at_ms=task.finished_at_ms,
            eta_ms=task.eta_ms,
            worker_id=task.worker_id,
            result=decode_value(task.result),
            error=task.error,
            payload=decode_value(task.payload) if task.payload else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if self.error is not None:
            out["error"] = msgspec.structs.asdict(self.error)
        for key in ("result", "payload"):
            if isinstance(out[key], bytes):
                out[key] = out[key].hex()
        return out


def _unwait(conn: Connection, rid: int) -> None:
    """A cancelled ``wait``: tell the broker, which would otherwise hold the wait (and count it
    against the connection's cap) until its timeout. Fire and forget: nobody awaits the ack."""
    conn.forget(rid)
    _send_quietly(conn, lambda urid: Unwait(urid, rid))


def _send_quietly(conn: Connection, build: Callable[[int], Any]) -> None:
    """Send a request whose answer nobody needs, if the connection is still up."""
    if conn.error is None and conn.transport is not None:
        try:
            urid = conn.next_rid()
            conn.send(urid, build(urid), 5.0).add_done_callback(
                lambda f: f.cancelled() or f.exception()
            )
        except TqError:
            pass


class _Resends:
    """When one ``AsyncClient.call`` sends its request again.

    Redirects and reconnects are retried for a while: a cluster elects a new leader in about a
    second, during which nodes answer NOT_LEADER without naming one. The window bounds one
    outage, not the call: it starts at a failure, again after a request that was answered or in
    flight for a while (a wait of 40 s that met a failover at 12 s used to fail at once, its
    window spent while it waited).

    A request that got no answer within its timeout is resent once (if safe to repeat), not for
    every timeout: a broker that is slow but alive, and still working on it, gets it twice at
    most (a submit's task id makes the second harmless); a second timeout is the caller's error.

    Nothing is resent across ``close()``: a request in flight when the client was closed fails
    with ``BrokerUnavailable("client closed")`` instead of connecting it again."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.closes = client._closes
        self.loop = asyncio.get_running_loop()
        self.window = max(client.connect_timeout_s, 5.0)
        self.deadline: float | None = None
        self.attempts = 0
        self.timeouts = 0

    def check_open(self) -> None:
        if self.client._closes != self.closes:
            raise BrokerUnavailable("client closed")

    def again(self, sent: float, *, safe: bool, timed_out: bool = False) -> bool:
        """After a failure of the request sent at ``sent``: send it again? (Raises if the
        client was closed meanwhile.)"""
        self.attempts += 1
        self.check_open()
        now = self.loop.time()
        if self.deadline is None or now - sent > 1.0:
            self.deadline = now + self.window
        if not safe or now > self.deadline:
            return False
        if timed_out:
            self.timeouts += 1
            return self.timeouts <= 1
        return True


class AsyncClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float | None = None,
        token: str | None = None,
        role: str = "client",
        client_id: str | None = None,
        hello_extra: dict[str, Any] | None = None,
        max_frame_bytes: int = DEFAULT_FRAME_LIMIT,
        liveness_s: float = LIVENESS_S,
        spin_us: int = CLIENT_SPIN_US,
    ) -> None:
        """``liveness_s``: with requests in flight and nothing heard for this long, ask the
        broker whether it is there; nothing after as long again, and they fail over (resent
        once, if safe to) as if their ``timeout_s`` had passed. 0 turns probing off.

        ``spin_us``: after sending a request the broker answers at once (not a ``wait`` or a
        parked claim), keep the event loop polling for the reply instead of sleeping, for up to
        this long, if the caller is going back to back (the last reply came within that time)
        and replies have been coming within it (``ReplyPoll``, tq/spin.py). The loop's other
        work runs as usual meanwhile; the price is this process's CPU. On a VM whose idle CPUs
        halt, waking for the reply is tens of µs of every round trip: a sequential submit here
        measured p50 0.26-0.31 against 0.32-0.41 ms, for ~270 against ~100 µs of client CPU.
        0 never polls."""
        if not (liveness_s == 0 or 0 < liveness_s < math.inf):  # NaN fails both
            raise BadRequest(f"liveness_s must be 0 (off) or a positive number, not {liveness_s}")
        if type(spin_us) is not int or not 0 <= spin_us <= MAX_CLIENT_SPIN_US:
            raise BadRequest(
                f"spin_us must be a whole number of µs from 0 to {MAX_CLIENT_SPIN_US}, "
                f"not {spin_us!r}"
            )
        self.addresses = parse_broker_url(broker_url_from_env(url))
        self.timeout_s = timeout_s
        self.liveness_s = liveness_s
        self.spin_us = spin_us
        self.connect_timeout_s = connect_timeout_from_env(connect_timeout_s)
        self.token = token if token is not None else auth_token_from_env()
        self.role = role
        self.client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.hello_extra = hello_extra or {}
        self.max_frame_bytes = max_frame_bytes
        self._conn: Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._connect_attempts = 0  # connects attempted so far
        # How the last one failed, with the close() calls made when it began (None: it did not)
        self._connect_failed: tuple[int, BrokerUnavailable] | None = None
        self._preferred = 0
        self._closes = 0  # close() calls so far: a request in flight across one is not resent
        self.on_connect: Callable[[], Any] | None = None

    # --- connection ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.error is None

    def unread(self) -> bool:
        """Whether the connection holds input nobody has read (``Connection.unread``)."""
        return self._conn is not None and self._conn.unread()

    @property
    def welcome(self) -> Welcome | None:
        """What the broker of the current connection said in answer to hello."""
        return self._conn.welcome if self._conn is not None else None

    async def connect(self) -> Connection:
        """Connect (or return the live connection), trying every address with backoff until
        ``connect_timeout_s`` passes."""
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        closes = self._closes
        attempts = self._connect_attempts
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.error is None:
                return conn
            failed = self._connect_failed
            if self._connect_attempts != attempts and failed is not None and failed[0] == closes:
                # An attempt that ran while this caller waited for its turn failed: its
                # verdict is this caller's too. Each starting one of its own made the requests
                # of a hung broker fail one connect timeout apart (10 s, 20 s, 30 s, ...). (Only
                # for callers from before the same close(): one made after it connects again,
                # and must not hear "client closed".) A refusal (a bad token) or a cancelled
                # attempt is not shared.
                raise BrokerUnavailable(str(failed[1]))
            self._connect_failed = None
            try:
                return await self._connect_locked(closes)
            except BrokerUnavailable as exc:
                self._connect_failed = (closes, exc)
                raise
            finally:
                self._connect_attempts += 1

    async def _connect_locked(self, closes: int) -> Connection:
        """The body of ``connect``, under its lock: every address, with backoff, until
        ``connect_timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        delay = 0.05
        last: BaseException | None = None
        last_at = ""
        while True:
            n = len(self.addresses)
            for i in range(n):
                host, port = self.addresses[(self._preferred + i) % n]
                try:
                    conn = await self._open(host, port, deadline)
                except (Unauthenticated, UnsupportedVersion, BadRequest):
                    raise  # the broker answered: retrying will not change its mind
                except (TimeoutError, OSError, TqError) as exc:
                    last, last_at = exc, f"{host}:{port}: "
                    continue
                if self._closes != closes:
                    # close() ran while this connect was under way: a connection opened
                    # now would be nobody's to close (and outlive a sync Client's loop).
                    conn.abort()
                    raise BrokerUnavailable("client closed")
                if isinstance(conn, Connection):
                    self._preferred = (self._preferred + i) % n
                    self._conn = conn
                    if self.on_connect is not None:
                        self.on_connect()
                    return conn
            if loop.time() + delay > deadline:
                where = ", ".join(f"{h}:{p}" for h, p in self.addresses)
                if n == 1:
                    last_at = ""  # said once is enough
                raise BrokerUnavailable(f"cannot reach a broker at {where}: {last_at}{last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _open(self, host: str, port: int, deadline: float) -> Connection:
        """Open one connection and say hello, both within what is left until ``deadline`` (the
        connect's): a broker that completes the TCP handshake but never answers (a SIGSTOPped
        or hung one, whose kernel still accepts) used to hold the connect for ``timeout_s``,
        past ``connect_timeout_s``. Each address gets at least ``MIN_ATTEMPT_S``, so the
        addresses after a hung one are still tried once the deadline has passed."""
        loop = asyncio.get_running_loop()
        left = max(MIN_ATTEMPT_S, deadline - loop.time())
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self.max_frame_bytes, self.liveness_s, self.spin_us),
                    host,
                    port,
                ),
                timeout=left,
            )
        except TimeoutError:
            raise BrokerUnavailable(f"no TCP connection within {round(left, 1):g} s") from None
        conn.address = f"{host}:{port}"
        hello = Hello(
            rid=conn.next_rid(),
            version=PROTOCOL_VERSION,
            role=self.role,
            client_id=self.client_id,
            token=self.token,
            host=socket.gethostname(),
            pid=os.getpid(),
            **self.hello_extra,
        )
        wait_s = min(self.timeout_s, max(MIN_ATTEMPT_S, deadline - loop.time()))
        try:
            reply = await conn.send(hello.rid, hello, wait_s)
            raise_for(reply)
        except TimeoutError:
            conn.abort()
            raise BrokerUnavailable(
                f"connected, but no hello answer within {round(wait_s, 1):g} s"
            ) from None
        except BaseException:
            conn.close()
            raise
        if isinstance(reply, Welcome):
            conn.welcome = reply
        return conn

    async def close(self) -> None:
        """Close the connection and wait (at most ``CLOSE_WAIT_S``) until it is closed: a
        transport still flushing to a broker that stopped reading would otherwise outlive its
        event loop (``asyncio.run`` returning right after ``close``) and leak its socket.

        Requests in flight fail with ``BrokerUnavailable`` and are not resent: a retried one
        used to reconnect the client being closed (and a sync ``Client``'s thread waiting on it
        then waited forever, its loop stopped under it). A request made after ``close`` connects
        again (the TUI drops a silent link this way)."""
        self._closes += 1
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        try:
            await asyncio.wait_for(conn.closed.wait(), CLOSE_WAIT_S)
        except TimeoutError:
            conn.abort()
            await asyncio.sleep(0)  # abort() reports connection_lost on the next iteration

    async def call(
        self,
        build: Callable[[int], Any],
        expect: type[R],
        *,
        retry: bool = True,
        timeout_s: float | None = None,
        on_abandon: Callable[[Connection, int], None] | None = None,
    ) -> R:
        """Send one request and return its typed reply, raising the broker's error for a NACK.

        With ``retry`` the request is resent after a lost connection or a leader change: only for
        requests that are safe to repeat. ``on_abandon(conn, rid)`` runs if the caller is
        cancelled while the request is in flight (to withdraw what the broker holds for it)."""
        tries = _Resends(self)
        loop = tries.loop
        while True:
            conn = self._conn
            if conn is None or conn.error is not None:
                tries.check_open()
                conn = await self.connect()
            rid = conn.next_rid()
            sent = loop.time()
            wait_s = timeout_s or self.timeout_s
            try:
                try:
                    reply = await conn.send(rid, build(rid), wait_s)
                except asyncio.CancelledError:
                    if on_abandon is not None:
                        on_abandon(conn, rid)
                    raise
                raise_for(reply)
            except NotLeader as exc:
                # Plain NOT_LEADER: the request was never taken, so any may go to the leader.
                # OUTCOME_UNKNOWN: it may yet be applied, so only one safe to repeat goes again.
                if not tries.again(sent, safe=retry or not isinstance(exc, OutcomeUnknown)):
                    raise
                self._follow(exc.leader)
                if exc.leader is None:
                    await asyncio.sleep(min(0.05 * tries.attempts, 0.3))
                continue
            except BrokerUnavailable:
                # (A connection another request's timeout dropped counts as a timeout.)
                if not tries.again(sent, safe=retry, timed_out=conn.timed_out):
                    raise
                await asyncio.sleep(min(0.02 * tries.attempts, 0.2))
                continue
            except TimeoutError as exc:
                # No answer at all: a hung broker (a SIGSTOPped or cut-off leader, whose
                # followers have elected another by now) or one far too slow. The connection is
                # what is suspect, and kept, every later request would queue behind this one on
                # it: drop it (the other requests in flight on it fail over with it, or fail if
                # not safe to resend), and start the next connect at the next address. (A
                # ``Silent`` connection says so sooner than ``wait_s``: nothing was heard on it,
                # not even the answer to a liveness probe.)
                detail = str(exc) or f"did not answer within {wait_s:g} s"
                error = BrokerUnavailable(f"the broker at {conn.address} {detail}")
                self._drop(conn, error)
                if not tries.again(sent, safe=retry, timed_out=True):
                    raise error from None
                continue
            if not isinstance(reply, expect):
                raise BrokerUnavailable(f"unexpected reply {type(reply).__name__}")
            return reply

    def _drop(self, conn: Connection, error: BrokerUnavailable) -> None:
        """Abort a connection that stopped answering; if it is the current one, the next
        connect tries the next address first (a single address is tried again)."""
        conn.timed_out = True
        conn.abort(error)
        if self._conn is conn:
            self._conn = None
            self._preferred = (self._preferred + 1) % len(self.addresses)

    def _follow(self, leader: str | None) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if leader:
            addr = parse_broker_url(leader)[0]
            if addr not in self.addresses:
                self.addresses.append(addr)
            self._preferred = self.addresses.index(addr)
        else:
            self._preferred = (self._preferred + 1) % len(self.addresses)

    # --- producer API ----------------------------------------------------------------------------

    @staticmethod
    def make_spec(
        name: str,
        payload: Any,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: str | int = "normal",
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff_s: float = 0.0,
        task_id: str | None = None,
    ) -> TaskSpec:
        try:
            prio = int(Priority.parse(priority))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return TaskSpec(
            id=new_ids.new() if task_id is None else task_id,  # "" is invalid, not "pick one"
            name=name,
            payload=encode_payload(payload),
            queue=queue,
            priority=prio,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
        )

    async def submit(
        self,
        name: str,
        payload: Any = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: str | int = "normal",
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff_s: float = 0.0,
        task_id: str | None = None,
    ) -> str:
        """Submit one task; returns its id once the broker has made it durable."""
        spec = self.make_spec(
            name,
            payload,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            task_id=task_id,
        )
        reply = await self.call(lambda rid: SubmitTask(rid, spec), Ack)
        return reply.ids[0]

    async def submit_specs(self, specs: list[TaskSpec]) -> list[str]:
        reply = await self.call(lambda rid: SubmitBatch(rid, specs), Ack)
        return reply.ids

    async def submit_batch(
        self,
        name: str,
        payloads: Iterable[Any],
        *,
        queue: str = DEFAULT_QUEUE,
        priority: str | int = "normal",
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff_s: float = 0.0,
    ) -> list[str]:
        """Submit many tasks of one kind in one durable write; ids come back in order."""
        try:
            prio = int(Priority.parse(priority))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        payload_list = [encode_payload(p) for p in payloads]
        ids = new_ids.many(len(payload_list))
        specs = [
            TaskSpec(tid, name, body, queue, prio, max_retries, timeout_s, backoff_s)
            for tid, body in zip(ids, payload_list, strict=True)
        ]
        if not specs:
            return []
        return await self.submit_specs(specs)

    async def status(self, task_id: str) -> TaskInfo:
        """The task as the broker has it now; raises ``TaskNotFound`` for an unknown id."""
        reply = await self.call(lambda rid: QueryStatus(rid, task_id), TaskInfoReply)
        return TaskInfo.from_task(reply.task)

    async def wait(self, task_id: str, timeout_s: float = 30.0) -> TaskInfo:
        """Return once the task is completed, dead or cancelled (the broker pushes it: no polling).

        Raises ``WaitTimeout`` if it is not finished within ``timeout_s``."""
        if not 0 <= timeout_s <= MAX_WAIT_S:  # NaN and inf fail this too
            raise BadRequest(f"timeout_s must be from 0 to {MAX_WAIT_S:g} seconds, not {timeout_s}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def request(rid: int) -> WaitTask:
            # Built again for each resend (a reconnect, a new leader): only what is left of
            # ``timeout_s``, so a broker restart does not stretch the caller's timeout.
            return WaitTask(rid, task_id, max(0, int((deadline - loop.time()) * 1000)))

        reply = await self.call(
            request, TaskInfoReply, timeout_s=timeout_s + self.timeout_s, on_abandon=_unwait
        )
        return TaskInfo.from_task(reply.task)

    async def list_page(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[TaskInfo], str | None]:
        """One page of tasks in ``state`` and the cursor for the next page (None at the end)."""
        reply = await self.call(
            lambda rid: ListTasks(rid, state, queue, name, limit, after), TaskListReply
        )
        return [TaskInfo.from_task(t) for t in reply.tasks], reply.next

    async def list(
        self,
        state: str = "pending",
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskInfo]:
        # The broker ends a page early when its results are big (it must fit in a frame):
        # follow the cursor until ``limit`` tasks or the end.
        tasks, after = await self.list_page(state, queue=queue, name=name, limit=limit)
        while after is not None and len(tasks) < limit:
            more, after = await self.list_page(
                state, queue=queue, name=name, limit=limit - len(tasks), after=after
            )
            tasks += more
        return tasks

    async def cancel(self, task_id: str) -> TaskInfo:
        reply = await self.call(lambda rid: CancelTask(rid, task_id), TaskInfoReply, retry=False)
        return TaskInfo.from_task(reply.task)

    async def pause_queue(self, queue: str) -> None:
        """Stop handing out this queue's tasks (submits are still accepted)."""
        await self.call(lambda rid: PauseQueue(rid, queue, True), Ack, retry=False)

    async def resume_queue(self, queue: str) -> None:
        await self.call(lambda rid: PauseQueue(rid, queue, False), Ack, retry=False)

    async def dead_letters(
        self,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        limit: int = 1000,
    ) -> builtins.list[TaskInfo]:
        """Dead-lettered tasks matching every filter given, up to ``limit``. The broker ends a
        reply at half its frame limit (dead tasks carry tracebacks), so this follows its cursor
        until ``limit`` tasks are in or none are left."""
        out: builtins.list[TaskInfo] = []
        after: str | None = None
        while len(out) < limit:

            def build(rid: int, cursor: str | None = after, n: int = limit - len(out)) -> Any:
                return DeadLetters(
                    rid, "list", [], queue, name, error_type, older_than_s, False, n, cursor
                )

            reply = await self.call(build, TaskListReply)
            out += [TaskInfo.from_task(t) for t in reply.tasks]
            after = reply.next
            if after is None or not reply.tasks:
                break
        return out

    async def _dlq_change(
        self,
        op: str,
        task_ids: builtins.list[str] | None,
        queue: str | None,
        name: str | None,
        error_type: str | None,
        older_than_s: float | None,
        dry_run: bool,
        limit: int,
    ) -> builtins.list[str]:
        reply = await self.call(
            lambda rid: DeadLetters(
                rid, op, task_ids or [], queue, name, error_type, older_than_s, dry_run, limit
            ),
            Ack,
            retry=False,
        )
        return reply.ids

    async def retry_dead(
        self,
        task_ids: builtins.list[str] | None = None,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> builtins.list[str]:
        """Send dead-lettered tasks (by id, or all matching the filters) back to pending with
        their attempts reset; returns the ids (with ``dry_run``: the ids it would retry)."""
        return await self._dlq_change(
            "retry", task_ids, queue, name, error_type, older_than_s, dry_run, limit
        )

    async def purge_dead(
        self,
        task_ids: builtins.list[str] | None = None,
        *,
        queue: str | None = None,
        name: str | None = None,
        error_type: str | None = None,
        older_than_s: float | None = None,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> builtins.list[str]:
        """Delete dead-lettered tasks for good; returns the ids (with ``dry_run``: would be)."""
        return await self._dlq_change(
            "purge", task_ids, queue, name, error_type, older_than_s, dry_run, limit
        )

    async def stats(self) -> dict[str, Any]:
        """``{"states": {state: count}, "queues": {...}, "workers": [...], ...}``"""
        reply = await self.call(GetStats, StatsReply)
        out: dict[str, Any] = msgspec.to_builtins(reply.stats)
        return out

    # --- live state and history ------------------------------------------------------------------

    async def watch(
        self, *, events: bool = True, interval_s: float = 0.5, buffer: int = 256
    ) -> AsyncIterator[WatchUpdate]:
        """Live broker state, pushed: a ``WatchUpdate`` with a ``Stats`` snapshot about every
        ``interval_s`` and, with ``events``, the task events since the previous update.

        The iterator ends with ``BrokerUnavailable`` when the connection is lost (call ``watch``
        again to resubscribe: it reconnects, following the leader in a cluster). If the consumer
        falls ``buffer`` updates behind, the oldest are discarded. Leaving the loop unsubscribes.
        """
        inbox: asyncio.Queue[Response | TqError] = asyncio.Queue()
        sub: list[tuple[Connection, int]] = []

        def put(item: Response | TqError) -> None:
            if inbox.qsize() >= buffer:
                inbox.get_nowait()
            inbox.put_nowait(item)

        def build(rid: int) -> Watch:
            conn = self._conn
            assert conn is not None
            sub[:] = [(conn, rid)]
            conn.add_stream(rid, put)
            return Watch(rid, events, max(1, int(interval_s * 1000)))

        try:
            await self.call(build, Ack)
        except BaseException:
            for conn, rid in sub:
                conn.remove_stream(rid)
            raise
        conn, rid = sub[0]
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, TqError):
                    raise item
                if isinstance(item, WatchUpdate):
                    yield item
        finally:
            conn.remove_stream(rid)
            _send_quietly(conn, lambda urid: Unwatch(urid, rid))

    async def report_progress(
        self, task_id: str, token: int, fraction: float = -1.0, message: str = ""
    ) -> None:
        """Tell watchers how far a running task has got (workers call this; see
        ``tq.progress``)."""
        await self.call(
            lambda rid: Progress(rid, task_id, token, fraction, message), Ack, retry=False
        )

    async def export_page(
        self,
        *,
        states: builtins.list[str] | None = None,
        queue: str | None = None,
        since_ms: int = 0,
        until_ms: int = 0,
        limit: int = 10_000,
        after: str | None = None,
    ) -> tuple[builtins.list[HistoryRow], str | None]:
        """One page of finished tasks (see ``ExportTasks``) and the cursor for the next."""
        chosen = states or ["completed", "failed", "dead", "cancelled"]
        reply = await self.call(
            lambda rid: ExportTasks(rid, chosen, queue, since_ms, until_ms, limit, after),
            ExportReply,
        )
        return reply.rows, reply.next

    async def export(
        self,
        *,
        states: builtins.list[str] | None = None,
        queue: str | None = None,
        since_ms: int = 0,
        until_ms: int = 0,
        page: int = 10_000,
    ) -> AsyncIterator[builtins.list[HistoryRow]]:
        """Every finished task matching the filters, page by page (constant memory)."""
        after: str | None = None
        while True:
            rows, after = await self.export_page(
                states=states,
                queue=queue,
                since_ms=since_ms,
                until_ms=until_ms,
                limit=page,
                after=after,
            )
            if rows:
                yield rows
            if after is None:
                return
