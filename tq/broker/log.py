"""The single-node command log: journal, apply, then group-commit one durable write.

Each loop tick's commands are appended to the journal (tq/store/journal.py) as one record, the
batch as a Raft entry would carry it (``CommandBatch``: the commands and the tick's clock), and
applied at once (RocksDB ``write`` with ``sync=False``, the index of the batch recorded in the
same write). A reply waits until the journal write covering its batch has returned: that write,
``O_DIRECT | O_DSYNC`` into preallocated blocks, is the only durable step of a commit. A batch
touching more than ``JOURNAL_OPS`` tasks (or bigger than ``JOURNAL_MAX_BYTES``) is not
journalled: its commit syncs RocksDB's WAL instead (which holds every batch of the commit), and
the journal restarts after it. Everything applied while a write runs joins the next one, so the
write rate adapts to load.

A small commit on an idle broker is written from the loop's own thread: handing it to the writer
thread and back costs two thread wake-ups, about as long as the write itself on a fast disk. It
is also started before the batch is applied (Linux AIO, tq/store/aio.py) and waited for after,
so the disk works while the state machine does. A larger commit (a busy tick) goes to the writer
thread so the loop keeps reading requests meanwhile.

When the journal is full (in bytes, or ``JOURNAL_MAX_RECORDS`` batches, which bounds recovery), a
checkpoint takes the place of a write: RocksDB's WAL, which holds every applied batch, is
fsynced, and the journal starts over after the last applied index. After a crash, RocksDB
recovers a consistent prefix of batches (its applied index says how far), the state machine
rebuilds its memory from it, and the journal's batches after that index are applied again, as a
restarted Raft replica applies the log entries it lacks: apply is deterministic (time comes from
the batch, lease deadlines and the worker table are stored), so the store comes back byte for
byte as it was (tests/broker/test_local_log.py checks that).

Commands, not effects (every put and delete a batch made, which is what format-2 journals hold
and what recovery still reads from one): a batch's commands are known before it is applied, so
its durable write can start first; its effects only after.

A failed write is fatal: the broker stops rather than acknowledge what it could not make durable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec

from tq.broker.commands import Claim, Command, CommandBatch, Extend, Release, Report, Submit
from tq.broker.state import ApplyResult, StateMachine
from tq.errors import NotLeader, OutcomeUnknown
from tq.logfields import kv
from tq.store import CF, Store
from tq.store.journal import SEGMENT_BYTES, Journal, JournalError

log = logging.getLogger("tq.broker.log")

DurableCallback = Callable[[BaseException | None], None]
INLINE_BYTES = 4096  # commits up to this size are written on the loop thread (see above)
JOURNAL_OPS = 32  # a batch touching more tasks than this is made durable by a store sync
JOURNAL_MAX_BYTES = 64 * 1024  # ... and so is one whose record is bigger (big payloads)
# A checkpoint at least this often: recovery applies at most this many batches again (19,000
# one-task batches took 0.65 s here).
JOURNAL_MAX_RECORDS = 10_000
_batch_enc = msgspec.msgpack.Encoder()
_batch_dec = msgspec.msgpack.Decoder(CommandBatch)
# A record saying the batch before it failed to apply (see LocalLog.append). 0xc1 is the one byte
# msgpack never uses, so no batch record starts with it.
VOID = b"\xc1tq-void:"


class LocalLog:
    def __init__(
        self,
        store: Store,
        sm: StateMachine,
        on_fatal: Callable[[BaseException], None],
        on_applied: Callable[[ApplyResult], None],
        journal_path: str,
        journal_bytes: int = SEGMENT_BYTES,
        spin_us: int = 0,
    ) -> None:
        self._store = store
        self._spin_ns = spin_us * 1000  # poll this long for an overlapped write (Aio.wait)
        self._sm = sm
        self._on_fatal = on_fatal
        self._on_applied = on_applied
        self._journal = Journal(journal_path, journal_bytes, max_records=JOURNAL_MAX_RECORDS)
        self._settings = sm.settings  # this run's flags, stamped on every record
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._index = 0  # the last batch applied (and appended to the journal)
        self._durable = 0  # batches covered by a finished write
        self._running_upto = -1  # batches the running write covers (-1: none running)
        self._running_cbs: list[DurableCallback] = []
        self._next_cbs: list[DurableCallback] = []
        self._start_scheduled = False
        self._inflight = False  # a write started before its batch was applied (see above)
        self._running_future: Future[None] | None = None  # the writer thread's, while it runs
        self._settled = -1  # batches up to this are durable though the log failed after them
        self.failed: BaseException | None = None
        self.flushes = 0
        self.flushed_commits = 0
        self.inline_flushes = 0
        self.checkpoints = 0
        self.store_syncs = 0
        self.replayed = 0
        self._sync_store = False  # the commit being gathered holds a batch not in the journal
        # Called once a commit's callbacks ran (their replies are queued): send them now, before
        # the next commit's write, rather than at the end of the loop iteration.
        self.on_delivered: Callable[[], None] | None = None

    is_leader = True  # a single node always serves

    def leader_client(self) -> str | None:
        return None

    def not_leader(self) -> NotLeader:  # unreachable for a single node, which always leads
        return NotLeader("this node does not lead")

    def status(self) -> dict[str, Any]:
        return {"role": "single"}

    def counters(self) -> dict[str, int]:
        return {
            "journal_inline_writes": self.inline_flushes,
            "journal_checkpoints": self.checkpoints,
            "journal_store_syncs": self.store_syncs,
            "journal_replayed": self.replayed,
        }

    def recover(self) -> int:
        """Open the store's state machine (``sm.recover()``, called from here) and bring it up
        to the last batch the journal holds, make the store durable, start the journal afresh.
        Returns how many batches were applied again."""
        raw = self._store.get(CF.META, b"applied_index")
        applied = int.from_bytes(raw, "big") if raw else 0
        records = self._journal.open(skip_through=applied)
        first = next(records, None)  # reads the header: the journal's format is known after it
        replayed = 0
        if self._journal.format == 2:
            # A journal from before format 3 holds effects: written back before the state
            # machine reads the store, they need no state machine.
            if first is not None:
                for index, payload in itertools.chain((first,), records):
                    if index != applied + 1:
                        break  # reported below
                    self._store.write_effects(payload)
                    applied, replayed = index, replayed + 1
            self._sm.recover()
        else:
            self._sm.recover()
            if first is not None:
                applied, replayed = self._apply_again(applied, itertools.chain((first,), records))
        if self._journal.next_index > applied + 1:  # (never below first_index)
            raise JournalError(
                f"the journal holds batches from {self._journal.first_index} on, but the store "
                f"only up to {applied}: batches in between are missing (was the data dir "
                "restored from a copy?); refusing to start rather than lose them silently"
            )
        if self._journal.created and applied > 0:
            log.warning("journal.missing", extra=kv(path=self._journal.path, applied=applied))
        self._store.flush_wal()
        self._journal.reset(applied + 1)
        self._journal.next_index = applied + 1
        self._index = self._durable = applied
        self.replayed = replayed
        return replayed

    def _apply_again(self, applied: int, records: Iterable[tuple[int, bytes]]) -> tuple[int, int]:
        """Apply the journal's batches after ``applied`` again; returns the last index reached
        and how many batches were applied.

        Under the settings they were first applied with (each record carries them, as a Raft
        entry does), whatever this start's flags. A batch followed by a ``VOID`` record naming
        it failed to apply the first time (its clients were told so), and is skipped: its index
        is applied as an empty batch, as is the ``VOID``'s own."""
        own = self._sm.settings
        replayed = 0
        try:
            held: tuple[int, bytes] | None = None  # one record of lookahead, for a VOID
            for index, payload in records:
                if index != applied + 1 + (held is not None):
                    break  # reported by the caller
                if payload.startswith(VOID):
                    if held is not None and int.from_bytes(payload[len(VOID) :], "big") == held[0]:
                        self._sm.apply(0, [], applied_index=held[0])
                        held = None
                        log.warning("journal.void_skipped", extra=kv(index=index - 1))
                    elif held is not None:
                        replayed += self._replay(*held)
                        held = None
                    self._sm.apply(0, [], applied_index=index)
                    applied = index
                    continue
                if held is not None:
                    replayed += self._replay(*held)
                    applied = held[0]
                held = (index, bytes(payload))
            if held is not None:
                replayed += self._replay(*held)
                applied = held[0]
        finally:
            self._sm.settings = own
        return applied, replayed

    def _replay(self, index: int, payload: bytes) -> int:
        batch = _batch_dec.decode(payload)
        self._sm.settings = batch.settings or self._settings
        self._sm.apply(batch.now_ms, batch.commands, applied_index=index)
        return 1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tq-wal")

    def append(
        self,
        now_ms: int,
        commands: Iterable[Command],
        done: Callable[[ApplyResult | BaseException], None],
    ) -> None:
        """Journal and apply now; ``done`` gets the result once it is durable."""
        cmds = commands if isinstance(commands, list) else list(commands)
        if self.failed is not None:
            done(self.failed)
            return
        index = self._index + 1
        journal = self._journal
        record: bytes | None = None
        if _size(cmds) <= JOURNAL_OPS:
            try:
                record = _batch_enc.encode(CommandBatch(now_ms, cmds, self._settings))
            except Exception as exc:  # (a bug: commands are validated before they get here)
                done(exc)
                self._fail(exc)
                return
            if len(record) > JOURNAL_MAX_BYTES:
                record = None
        if record is None:
            # A big batch (a client's batch of submits, a worker's results): writing it twice,
            # to RocksDB and to the journal, costs more than syncing RocksDB's WAL once, which
            # the commit does instead (and which covers the whole commit).
            journal.next_index = index + 1
            self._sync_store = True
        else:
            journal.append(index, record)
            if (
                self._running_upto < 0
                and not self._next_cbs
                and not self._sync_store
                and journal.pending_bytes <= INLINE_BYTES
                and journal.fits(journal.pending_bytes)
            ):
                # Idle, and small: start the write now, so it runs while the batch is applied.
                try:
                    journal.start_write(journal.take(), overlap=True)
                except BaseException as exc:  # any failure to persist is fatal
                    done(exc)
                    self._fail(exc)
                    return
                self._running_upto = index
                self._inflight = True
                self.inline_flushes += 1
        try:
            result = self._sm.apply(now_ms, cmds, applied_index=index)
        except Exception as exc:
            # The store refused a write or a read (disk full, I/O error): the state machine's
            # memory may be ahead of the store now, so the only safe answer is the one a failed
            # flush gets. Before, the exception escaped into the event loop: this tick's
            # clients never got a reply, and the broker stayed up, stuck, saying it was ready.
            self._apply_failed(index, record is not None, exc, done)
            return
        self._index = index
        self._on_applied(result)
        if self.failed is not None and index <= self._settled:
            # on_applied appended a batch that failed to apply, and _apply_failed made this one
            # durable first: it stands, whatever the log does now. (Not when_durable: reads
            # must not run on a memory that may hold part of the failed batch.)
            done(result)
            return

        def durable(exc: BaseException | None) -> None:
            done(exc if exc is not None else result)

        self.when_durable(durable)
        if self._inflight and not self._start_scheduled:
            # Waited for at the end of the tick (``kick``), or in the next loop iteration.
            self._start_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._start_flush)

    def when_durable(self, cb: DurableCallback) -> None:
        """Call ``cb`` once everything applied so far is on disk (at once if it already is)."""
        if self.failed is not None:
            cb(self.failed)
        elif self._index == self._durable:
            cb(None)
        elif self._index == self._running_upto:
            self._running_cbs.append(cb)
        else:
            self._next_cbs.append(cb)
            if self._running_upto < 0 and not self._start_scheduled:
                self._start_scheduled = True
                assert self._loop is not None
                # Let the rest of this tick's writes join the same flush.
                self._loop.call_soon(self._start_flush)

    @property
    def threads_idle(self) -> bool:
        """No write runs in the writer thread, so nothing will come from it while the event
        loop polls its sockets (TcpServer's spin)."""
        return self._running_future is None

    def kick(self) -> None:
        """End of a tick: start the flush (or finish the one in flight) now instead of one loop
        iteration later."""
        if self._inflight or (self._next_cbs and self._running_upto < 0):
            self._start_flush()

    def _start_flush(self) -> None:
        self._start_scheduled = False
        if self._inflight:
            self._inflight = False
            try:
                self._journal.finish_write(self._spin_ns)
            except BaseException as exc:  # any failure to persist is fatal
                self._flush_done(exc)
            else:
                self._flush_done(None)
            return
        if self._running_upto >= 0 or not self._next_cbs:
            return
        assert self._executor is not None
        assert self._loop is not None
        upto = self._running_upto = self._index
        self._running_cbs, self._next_cbs = self._next_cbs, []
        data = self._journal.take()
        sync_store, self._sync_store = self._sync_store, False
        if sync_store:
            loop = self._loop
            fut = self._running_future = self._executor.submit(self._sync, upto)
            fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._flush_finished, f))
            return
        if len(data) <= INLINE_BYTES and self._journal.fits(len(data)):
            self.inline_flushes += 1
            try:
                self._journal.write(data)
            except BaseException as exc:  # any failure to persist is fatal
                self._flush_done(exc)
            else:
                self._flush_done(None)
            return
        loop = self._loop
        fut = self._running_future = self._executor.submit(self._persist, data, upto)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._flush_finished, f))

    def _persist(self, data: bytes, upto: int) -> None:
        """Writer thread: journal ``data`` (batches up to ``upto``), or checkpoint when full."""
        if self._journal.fits(len(data)):
            self._journal.write(data)
            return
        self._sync(upto)
        self.checkpoints += 1

    def _sync(self, upto: int) -> None:  # counted in store_syncs (checkpoints included)
        """Writer thread: every batch up to ``upto`` is in RocksDB's WAL (each was applied before
        it was journalled, or instead): syncing that WAL makes them durable, and the journal
        starts over after them (so the next record it holds continues the store)."""
        self._store.flush_wal()
        self._journal.reset(upto + 1, lazy=True)
        self.store_syncs += 1

    def _apply_failed(
        self,
        index: int,
        journalled: bool,
        exc: BaseException,
        done: Callable[[ApplyResult | BaseException], None],
    ) -> None:
        """Batch ``index`` failed to apply (the store refused a write or a read): the broker
        stops, and what everyone hears must be what a restart will show.

        The batches before it were applied: they are made durable now (the write running for
        them waited for, the rest written, or the store synced where a big batch is among them)
        and their clients get their answers. This batch's record may already be on disk (its
        write starts before the apply on an idle broker), so a ``VOID`` record after it tells
        recovery to skip it, and its clients hear it failed. If any of that cannot be written,
        nobody can say what a restart will show: everyone waiting gets ``OUTCOME_UNKNOWN``."""
        journal = self._journal
        settled = False
        try:
            if self._inflight:
                self._inflight = False
                journal.finish_write()
            running, self._running_future = self._running_future, None
            if running is not None:
                running.result()  # the writer thread's write or store sync (we stop anyway)
            if self._sync_store:
                # A big batch before this one has no record: RocksDB's WAL holds it and every
                # other batch before this one. This one's record, if any, is not written yet
                # (a write only starts before the apply with no big batch pending): drop it.
                self._store.flush_wal()
                journal.take()
            else:
                if journalled:
                    journal.append(index + 1, VOID + index.to_bytes(8, "big"))
                journal.write(journal.take())
            settled = True
        except BaseException:
            log.exception("journal.settle_failed", extra=kv(index=index))
        if settled:
            cbs = self._running_cbs + self._next_cbs
            self._running_cbs, self._next_cbs = [], []
            self._running_upto = -1
            self._durable = self._settled = self._index
            self._deliver(cbs, then=lambda: done(exc))
            self._fail(exc)
            return
        unknown = OutcomeUnknown(
            f"{exc}; the broker stopped and could not tell whether what it was writing is on "
            "disk: it may be applied when the broker restarts"
        )
        done(unknown)
        self._fail(exc, told=unknown)

    def _fail(self, exc: BaseException, told: BaseException | None = None) -> None:
        """A write failed: everyone waiting hears it (or ``told``), and the broker stops
        (once)."""
        cbs, self._running_cbs = self._running_cbs + self._next_cbs, []
        self._next_cbs = []
        first = self.failed is None
        if first:
            self.failed = exc
            log.critical("store.flush_failed", extra=kv(error=str(exc)))
        for cb in cbs:
            cb(told or self.failed or exc)
        if first:
            self._on_fatal(exc)

    def _flush_finished(self, fut: Future[None]) -> None:
        self._flush_done(fut.exception())

    def _flush_done(self, exc: BaseException | None) -> None:
        if exc is not None:
            self._fail(exc)
            return
        if self.failed is not None:
            return  # settled by _apply_failed, or failed: nobody is waiting any more
        self._running_future = None
        cbs, self._running_cbs = self._running_cbs, []
        self.flushes += 1
        self.flushed_commits += self._running_upto - self._durable
        self._durable = self._running_upto
        self._running_upto = -1
        self._deliver(cbs)
        if self._next_cbs:
            self._start_flush()

    def _deliver(self, cbs: list[DurableCallback], then: Callable[[], None] | None = None) -> None:
        """Tell ``cbs`` their batches are durable (then run ``then``), and hand the replies
        they queued to the sockets now (``on_delivered``)."""
        for cb in cbs:
            try:
                cb(None)
            except Exception:  # one bad callback must not cost the replies of the others
                log.exception("log.durable_callback_failed")
        if then is not None:
            then()
        if self.on_delivered is not None:
            try:
                self.on_delivered()
            except Exception:  # socket code must never stand between a commit and the next
                log.exception("log.on_delivered_failed")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._journal.close()


def _size(commands: list[Command]) -> int:
    """How many tasks a batch touches, about: what its effects cost to journal."""
    n = 0
    for cmd in commands:
        if isinstance(cmd, Submit):
            n += len(cmd.specs)
        elif isinstance(cmd, Report):
            n += len(cmd.outcomes)
        elif isinstance(cmd, Claim):
            n += cmd.max
        elif isinstance(cmd, Extend | Release):
            n += len(cmd.leases)
        else:
            n += 1
    return n
