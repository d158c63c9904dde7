"""The replicated command log: PySyncObj 0.3.17 wrapped for tq. The only importer of pysyncobj.

What this closes around PySyncObj (see REPORT.md for the file:line facts behind each point):

* Durable journal. ``DurableJournal`` replaces pysyncobj's mmap ``FileJournal`` (never fsync'd).
  It is plugged in by passing the journal *object* as ``SyncObjConf.journalFile`` and patching
  ``pysyncobj.syncobj.createJournal`` (the name syncobj.py imported at load time; patching
  ``pysyncobj.journal.createJournal`` has no effect) to return it.
* Group commit. ``add()`` only buffers. One ``fdatasync`` per Raft tick covers everything appended
  in that tick: at the end of the tick (after the leader queued this tick's commands) and at the
  start of the next one (after the poll in which a follower appended entries). A follower's
  acknowledgement (``next_node_idx``) is sent synchronously by pysyncobj right after it appends,
  so ``_TqTransport`` holds outgoing messages while the journal has unsynced entries and releases
  them right after the fsync: nothing is acknowledged before it is on disk. The leader counts its
  own log in the commit index; the fsync at the start of each tick runs before that count.
* Term and vote are written with fsync + rename + dir fsync before any message depending on them.
* The Raft thread never runs the state machine: the ``@replicated apply_entry`` hands the entry to
  the asyncio loop with ``call_soon_threadsafe``; the loop applies strictly in log order (FIFO of
  ``call_soon_threadsafe``), skips indexes it already has (pysyncobj replays its journal from the
  start or from the snapshot on every restart), and never raises.
* Snapshots (log compaction) go through a custom ``serializer``/``deserializer``: the serializer
  only queues the capture (a RocksDB checkpoint) in the loop, after every apply up to the
  snapshot index; the tar, pickle and fsync run in a thread of their own, and pysyncobj's
  ``serializeChecker`` hook says when the file is in place, so the Raft thread never waits for
  a snapshot. No fork, no pickling of our objects.
* ``password`` for peer traffic, ``bindAddress`` so the Raft port does not listen on 0.0.0.0.
"""

from __future__ import annotations

import _socket
import asyncio
import concurrent.futures
import errno
import glob
import io
import json
import logging
import os
import pickle
import shutil
import socket
import struct
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast

import msgspec
import pysyncobj.syncobj as _pso
from cryptography.fernet import InvalidToken
from pysyncobj import (
    FAIL_REASON,
    SERIALIZER_STATE,
    SyncObj,
    SyncObjConf,
    SyncObjConsumer,
    SyncObjException,
    replicated,
)
from pysyncobj.journal import Journal
from pysyncobj.transport import TCPTransport

from tq.broker.commands import Announce, Command, CommandBatch
from tq.broker.state import ApplyResult
from tq.broker.state import StateMachine as TqStateMachine
from tq.errors import InternalError, NotLeader, OutcomeUnknown, TqError
from tq.store import Store, StoreError
from tq.store.files import fsync_dir, write_durably

log = logging.getLogger("tq.broker.cluster")

# pysyncobj/win_inet_pton.py replaces socket.inet_ntop on every platform (only its inet_pton
# assignment is under `if os.name == "nt"`) with a Windows-only function that raises TypeError:
# psutil's net_connections, for one, broke in any process that had imported pysyncobj. Put the
# C implementation back.
socket.inet_ntop = _socket.inet_ntop

ROLES = {0: "follower", 1: "candidate", 2: "leader"}
FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RaftError(Exception):
    code = "RAFT"

    def __init__(self, message: str, *, leader: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.leader = leader
        self.reason = reason


class RaftNotLeader(RaftError):
    """Not accepted here. ``leader`` is the last known leader's Raft address (None during an
    election). ``reason`` is pysyncobj's FAIL_REASON name; for LEADER_CHANGED / UNKNOWN_OUTCOME
    the entry may still have been committed, so retries must be deduplicated (by task id)."""

    code = "NOT_LEADER"


class ProposalTimeout(RaftError):
    code = "TIMEOUT"  # outcome unknown


class Overloaded(RaftError):
    code = "OVERLOADED"  # pysyncobj's commands queue is full


class Closed(RaftError):
    code = "CLOSED"


class JournalError(RaftError):
    code = "JOURNAL"


class MembersMismatch(RaftError):
    """``--peers`` names other members than this node's Raft data records (a start-up refusal:
    ``tq broker`` exits 2 with this message)."""

    code = "MEMBERS"


# --------------------------------------------------------------------------------------------
# Durable journal
# --------------------------------------------------------------------------------------------

_MAGIC = b"TQRAFTJ1"
_REC = struct.Struct("<IIQQ")  # payload length, crc32(idx, term, payload), idx, term


class DurableJournal(Journal):
    """pysyncobj's Journal interface (journal.py:9-48) backed by an append-only file.

    Entries are ``(command: bytes, idx: int, term: int)`` kept in memory (as pysyncobj's own
    journals do) and appended as ``[len][crc][idx][term][payload]`` records. ``add`` buffers;
    ``sync`` writes the buffer and fdatasyncs once. A torn or corrupt tail found at open is cut
    off (it was never acknowledged).

    ``deleteEntriesFrom`` never touches the file at once: the dropped records stay on disk as
    "stale" until the next ``sync``, and if pysyncobj re-adds the very same entries (it does so
    whenever a leader re-sends entries a follower already has, syncobj.py:991-1006) they are
    re-adopted without a write. So a crash between the truncation and the re-append can never
    lose entries this node already acknowledged.

    Compaction (``deleteEntriesTo``) writes the kept entries to a temp file and renames it, so a
    crash in the middle never loses the tail (pysyncobj's FileJournal rewrites in place,
    journal.py:252-256).

    Every method runs in the Raft thread, except the constructor and the read-only counters.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta_path = path + ".meta"
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []
        self._pending = bytearray()  # records to write at self._end
        self._stale: list[tuple[bytes, int, int]] = []  # on disk in [_end, _phys_end), dropped
        self._end = 0  # logical end of the records in the file
        self._phys_end = 0  # physical end of the file
        self.failed: BaseException | None = None
        # counters
        self.syncs = 0
        self.synced_entries = 0
        self._unsynced_entries = 0
        self.sync_seconds = 0.0
        self.opened_entries = 0
        self.truncated_tail_bytes = 0
        self.readopted_entries = 0
        self._meta: dict[str, Any] = {}
        self._meta_dirty = False
        self._load_meta()
        self._fd = self._open()

    # --- files -------------------------------------------------------------------------------

    def _load_meta(self) -> None:
        try:
            with open(self.meta_path, "rb") as f:
                self._meta = json.loads(f.read())
        except FileNotFoundError:
            self._meta = {}

    def _store_meta(self) -> None:
        write_durably(self.meta_path, json.dumps(self._meta).encode())
        self._meta_dirty = False

    def _open(self) -> int:
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        if not os.path.exists(self.path):
            write_durably(self.path, _MAGIC)
        fd = os.open(self.path, os.O_RDWR)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        try:
            entries, offsets, off = self.parse(data, self.path)
        except JournalError:
            os.close(fd)
            raise
        end = len(data)
        if off != end:
            self.truncated_tail_bytes = end - off
            log.warning("journal %s: cutting %d bytes of torn tail", self.path, end - off)
            os.ftruncate(fd, off)
            os.fsync(fd)
        self._entries, self._offsets = entries, offsets
        self._end = self._phys_end = off
        self.opened_entries = len(entries)
        return fd

    @staticmethod
    def parse(data: bytes, path: str) -> tuple[list[tuple[bytes, int, int]], list[int], int]:
        """The entries of a journal file's bytes, their offsets, and where the valid records
        end (a torn or corrupt tail starts there)."""
        if data[: len(_MAGIC)] != _MAGIC:
            raise JournalError(f"{path}: not a tq raft journal")
        off = len(_MAGIC)
        entries, offsets = [], []
        end = len(data)
        prev_idx = None
        while off + _REC.size <= end:
            ln, crc, idx, term = _REC.unpack_from(data, off)
            start = off + _REC.size
            if start + ln > end:
                break
            payload = bytes(data[start : start + ln])
            if zlib.crc32(payload, zlib.crc32(data[off + 8 : off + 24])) != crc:
                break
            if prev_idx is not None and idx != prev_idx + 1:
                break
            entries.append((payload, idx, term))
            offsets.append(off)
            prev_idx = idx
            off = start + ln
        return entries, offsets, off

    @staticmethod
    def _record(command: bytes, idx: int, term: int) -> bytes:
        it = struct.pack("<QQ", idx, term)
        crc = zlib.crc32(command, zlib.crc32(it))
        return struct.pack("<II", len(command), crc) + it + command

    def _rewrite(self, keep: list[tuple[bytes, int, int]]) -> None:
        """Replace the file by one holding ``keep`` (durably), then reopen it."""
        buf = bytearray(_MAGIC)
        offsets = []
        for cmd, idx, term in keep:
            offsets.append(len(buf))
            buf += self._record(cmd, idx, term)
        write_durably(self.path, bytes(buf))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._entries = list(keep)
        self._offsets = offsets
        self._end = self._phys_end = len(buf)
        self._pending.clear()
        self._stale.clear()
        self.synced_entries += self._unsynced_entries
        self._unsynced_entries = 0

    # --- group commit --------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._pending) or self._end != self._phys_end

    def sync(self) -> None:
        """Make everything appended so far durable with one fdatasync. Raises JournalError
        forever after a failure: a failed fsync is never retried (the page cache may have
        dropped the dirty pages), the node stops acknowledging instead."""
        if self.failed is not None:
            raise JournalError(f"journal failed: {self.failed}") from self.failed
        if not self._pending and self._end == self._phys_end:
            return
        t0 = time.perf_counter()
        try:
            if self._end < self._phys_end:  # drop stale records for good
                os.ftruncate(self._fd, self._end)
                self._phys_end = self._end
                self._stale.clear()
            while self._pending:
                n = os.pwrite(self._fd, self._pending, self._end)
                self._end += n
                del self._pending[:n]
            self._phys_end = self._end
            os.fdatasync(self._fd)
        except OSError as exc:
            self.failed = exc
            log.critical("journal.sync_failed %s: %s", self.path, exc)
            raise JournalError(f"journal sync failed: {exc}") from exc
        self.syncs += 1
        self.synced_entries += self._unsynced_entries
        self._unsynced_entries = 0
        self.sync_seconds += time.perf_counter() - t0

    # --- Journal interface (journal.py:9-48) ---------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        if isinstance(command, str):  # pysyncobj's to_bytes (pickle.py)
            command = command.encode("utf-8")
        entry = (command, idx, term)
        if self._stale and not self._pending:
            if self._stale[0] == entry:  # re-sent entry already on disk: re-adopt it
                self._stale.pop(0)
                self._entries.append(entry)
                self._offsets.append(self._end)
                self._end += _REC.size + len(command)
                self.readopted_entries += 1
                return
            self._stale.clear()  # a real conflict: truncated at the next sync
        self._entries.append(entry)
        self._offsets.append(self._end + len(self._pending))
        self._pending += self._record(command, idx, term)
        self._unsynced_entries += 1

    def clear(self) -> None:
        self._rewrite([])

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries at list positions >= entryFrom (conflicting suffix from an old term)."""
        if entryFrom >= len(self._entries):
            return
        off = self._offsets[entryFrom]
        dropped = len(self._entries) - entryFrom
        if off >= self._end:  # only buffered records go
            del self._pending[off - self._end :]
            self._unsynced_entries = max(0, self._unsynced_entries - dropped)
        else:  # records on disk become stale (cut at the next sync unless re-added)
            on_disk = [
                e
                for e, o in zip(self._entries[entryFrom:], self._offsets[entryFrom:], strict=True)
                if o < self._end
            ]
            self._unsynced_entries = max(0, self._unsynced_entries - (dropped - len(on_disk)))
            self._stale = on_disk + self._stale
            self._pending.clear()
            self._end = off
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries at list positions < entryTo (after a snapshot covers them)."""
        self._rewrite(self._entries[entryTo:])

    def __getitem__(self, item: int | slice) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        try:
            if self.failed is None:
                self.sync()
                if self._meta_dirty:
                    self._store_meta()
        finally:
            os.close(self._fd)

    def flush(self) -> None:
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        # Only a hint (restart applies the local journal up to it); saved once a second.
        if self._meta.get("commit") != raftCommitIndex:
            self._meta["commit"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("commit", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft: term and vote must be durable before any message reflecting them is sent.
        self._meta["term"] = term
        self._meta["voted"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> Any:
        return self._meta.get("voted")

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            self.sync()  # the commit index saved never points past the durable journal
            self._store_meta()


# createJournal plug: syncobj.py:41 did `from .journal import createJournal` and calls it at
# syncobj.py:166 as createJournal(conf.journalFile). Patch *that* name; pass a Journal instance
# as journalFile and it is used as is, anything else keeps the stock behaviour.
_stock_create_journal = _pso.createJournal


def _create_journal(journal_file: Any) -> Journal:
    if isinstance(journal_file, Journal):
        return journal_file
    return _stock_create_journal(journal_file)


_pso.createJournal = _create_journal
_MEMBERSHIP = bytes([_pso._COMMAND_TYPE.MEMBERSHIP])  # first byte of a membership entry


# --------------------------------------------------------------------------------------------
# SyncObj / transport subclasses: the group-commit hooks
# --------------------------------------------------------------------------------------------


class _AuthWatch:
    """The cluster secret's Fernet on one connection, reporting a message that does not verify.

    pysyncobj's TcpConnection drops a connection whose message fails to decrypt without a word
    (tcp_connection.py:284-297, a bare ``except``): a node given another ``--raft-secret-file``
    sat at term 0 for ever and no node said why."""

    def __init__(self, fernet: Any, report: Callable[[], None]) -> None:
        self._fernet = fernet
        self._report = report

    def encrypt_at_time(self, data: bytes, at: int) -> bytes:
        return bytes(self._fernet.encrypt_at_time(data, at))

    def extract_timestamp(self, data: bytes) -> int:
        try:
            return int(self._fernet.extract_timestamp(data))
        except InvalidToken:
            self._report()
            raise

    def decrypt(self, data: bytes) -> bytes:
        try:
            return bytes(self._fernet.decrypt(data))
        except InvalidToken:
            self._report()
            raise


# A dialed peer that closes the connection this soon after it opened, before answering the key
# exchange, refused our first message: most likely a different secret (a frozen peer would
# hold it until connectionTimeout, 3.5 s). Reported after this many in a row.
_HANDSHAKE_REFUSED_S = 1.0
_HANDSHAKE_REFUSED_REPORT = 2


class _TqTransport(TCPTransport):
    """Holds outgoing messages while the journal has unsynced entries, once an ack is among
    them (order to a node is kept by holding everything after the first held message).

    Also says when a peer's traffic does not authenticate (``_AuthWatch``): logged once per
    peer as ``raft.peer_auth_failed``, counted in ``tq_auth_failures`` for ``cluster status``.
    A node that dials sees the peer drop the connection during the key exchange; the node dialed
    sees a message that does not decrypt, from an address it cannot map to a member (the dialer's
    port is ephemeral and it never got to say who it is)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._tq_held: list[tuple[Any, Any]] = []
        # peer -> {"count", "last" (monotonic), "how"}; read by status() from the loop thread
        self.tq_auth_failures: dict[str, dict[str, Any]] = {}
        self._tq_handshakes: dict[Any, float] = {}  # outgoing conn -> when it connected
        self._tq_refused_in_row: dict[str, int] = {}
        # monotonic time of the last message from each peer (by address), for `cluster status`
        self.tq_last_contact: dict[str, float] = {}
        self._tq_journal: DurableJournal = syncObj._tq_journal
        self._tq_keep_next_index: bool = syncObj._tq_keep_next_index
        # name-mangled private dict of SyncObj (syncobj.py:178), pinned to 0.3.17
        self._tq_next_index: dict[Any, int] = syncObj._SyncObj__raftNextIndex
        syncObj._tq_transport = self
        super().__init__(syncObj, selfNode, otherNodes)

    def send(self, node: Any, message: Any) -> bool:
        if self._tq_held or (
            self._tq_journal.dirty
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
        ):
            self._tq_held.append((node, message))
            return True
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self.tq_last_contact[getattr(node, "address", str(node))] = time.monotonic()
        # pysyncobj's leader sets nextIndex back to the acknowledged position on every
        # successful ack (syncobj.py:1079-1082) although it already sent further entries
        # (:1273): with several entries in flight every ack makes it re-send entries the
        # follower has, and the follower truncates and re-appends them (:991-1006, logging
        # "truncating already-applied log entries"). Keep the optimistic nextIndex; a real
        # gap is answered with reset=True (:985-990), which still rewinds it.
        if (
            isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("reset")
            and not message.get("success")
        ):
            # A failed append answers with where the follower wants to resume, always below the
            # batch it rejected (syncobj.py:984-989). With a burst of batches in flight, the
            # answers to later batches arrive after the one that found the conflict and would
            # move nextIndex forward again (pysyncobj applies every reset, :1079-1080): the
            # conflicting suffix of a deposed leader would never be overwritten. A failed reset
            # therefore never raises nextIndex.
            nxt = self._tq_next_index
            before = nxt.get(node)
            super()._onMessageReceived(node, message)
            after = nxt.get(node)
            if before is not None and after is not None and after > before:
                nxt[node] = before
            return
        if (
            self._tq_keep_next_index
            and isinstance(message, dict)
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
        ):
            nxt = self._tq_next_index
            before = nxt.get(node)
            super()._onMessageReceived(node, message)
            after = nxt.get(node)
            if before is not None and after is not None and after < before:
                nxt[node] = before
            return
        super()._onMessageReceived(node, message)

    # --- authentication failures (Raft thread) --------------------------------------------

    def _tq_auth_failed(self, peer: str, how: str) -> None:
        entry = self.tq_auth_failures.get(peer)
        if entry is None:
            # Never the secret, nor anything derived from it: who, and the likely cause.
            log.warning(
                "raft.peer_auth_failed peer=%s: %s (a different --raft-secret-file?)", peer, how
            )
            entry = {"count": 0, "last": 0.0, "how": how}
        entry = {**entry, "count": entry["count"] + 1, "last": time.monotonic()}
        self.tq_auth_failures = {**self.tq_auth_failures, peer: entry}  # replaced, not mutated

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        if conn.encryptor is not None:
            try:
                host, port = conn._TcpConnection__socket.getpeername()[:2]
                where = f"{host}:{port}"
            except (OSError, AttributeError, ValueError):
                host = where = "?"
            conn.encryptor = _AuthWatch(
                conn.encryptor,
                # once per host: the port of an incoming connection changes at every retry
                lambda: self._tq_auth_failed(
                    f"{host} (incoming)", f"a message from {where} did not decrypt"
                ),
            )

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and conn.encryptor is not None:
            address = node.address
            conn.encryptor = _AuthWatch(
                conn.encryptor,
                lambda: self._tq_auth_failed(address, "a message did not decrypt"),
            )

    def _onOutgoingConnected(self, conn: Any) -> None:
        if self._syncObj.encryptor:
            self._tq_handshakes[conn] = time.monotonic()
        super()._onOutgoingConnected(conn)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        if self._tq_handshakes.pop(conn, None) is not None:
            node = self._connToNode(conn)
            if node is not None:
                self._tq_refused_in_row.pop(node.address, None)
        super()._onOutgoingMessageReceived(conn, message)

    def _onDisconnected(self, conn: Any) -> None:
        started = self._tq_handshakes.pop(conn, None)
        if started is not None and time.monotonic() - started < _HANDSHAKE_REFUSED_S:
            node = self._connToNode(conn)
            if node is not None:
                n = self._tq_refused_in_row.get(node.address, 0) + 1
                self._tq_refused_in_row[node.address] = n
                if n >= _HANDSHAKE_REFUSED_REPORT:
                    self._tq_auth_failed(
                        node.address, "it closed the connection during the key exchange"
                    )
        super()._onDisconnected(conn)

    def tq_release(self) -> None:
        held, self._tq_held = self._tq_held, []
        for node, message in held:
            super().send(node, message)


class _TqSyncObj(SyncObj):
    """SyncObj with a journal fsync at the start and at the end of every tick.

    Attributes are set before ``SyncObj.__init__`` (which starts the Raft thread)."""

    def __init__(self, journal: DurableJournal, *args: Any, **kwargs: Any) -> None:
        self._tq_journal = journal
        self._tq_transport: _TqTransport | None = None
        self._tq_on_fatal: Callable[[BaseException], None] | None = kwargs.pop("on_fatal", None)
        self._tq_on_membership: Callable[[int, str, str], None] | None = kwargs.pop(
            "on_membership", None
        )
        self._tq_keep_next_index: bool = kwargs.pop("keep_next_index", True)
        self._tq_fatal_reported = False
        self._tq_last_tick = 0.0
        self._tq_max_gap = 0.0
        self._tq_next_ping = 0.0
        super().__init__(*args, transportClass=_TqTransport, **kwargs)
        self.addOnTickCallback(self._tq_flush)  # end of tick: after this tick's commands
        self.addOnTickCallback(self._tq_keepalive)
        self.addOnTickCallback(self._tq_wake_if_alone)

    def _tq_wake_if_alone(self) -> None:
        # A cluster of one member: the leader appends this tick's commands after it counted
        # commits (syncobj.py _onTick), and no peer's answer wakes the poll that follows, so
        # every entry waited the whole autoTickPeriod: 52 ms a sequential submit, measured.
        # With entries left to commit, wake the poll at once (the next tick commits them).
        if self.otherNodes or not self._isLeader():
            return
        if self._SyncObj__getCurrentLogIndex() > self._SyncObj__raftCommitIndex:
            notifier = getattr(self, "_SyncObj__pipeNotifier", None)
            if notifier is not None:
                notifier.notify()

    def _tq_keepalive(self) -> None:
        # Followers never send each other anything, and a TcpConnection that read nothing for
        # connectionTimeout is dropped on the next send (tcp_connection.py:141-149, 227-236):
        # after a leader dies the first request_vote between the survivors is silently lost
        # and the failover waits for another election timeout. A message type SyncObj ignores
        # (syncobj.py:909-1083 match none) keeps every link read. Also catches dead links.
        now = time.monotonic()
        if now < self._tq_next_ping or self._tq_transport is None:
            return
        self._tq_next_ping = now + self.conf.connectionTimeout / 4
        for node in self.otherNodes:
            if self.isNodeConnected(node):
                self._tq_transport.send(node, {"type": "tq_ping"})

    def _tq_flush(self) -> None:
        try:
            self._tq_journal.sync()
        except JournalError as exc:
            if not self._tq_fatal_reported and self._tq_on_fatal is not None:
                self._tq_fatal_reported = True
                self._tq_on_fatal(exc)
            raise
        if self._tq_transport is not None and self._tq_transport._tq_held:
            self._tq_transport.tq_release()

    def _SyncObj__doApplyCommand(self, command: Any) -> Any:
        # Every committed entry passes here (syncobj.py:717), a membership change too (pysyncobj
        # already switched its configuration when the entry was appended; this is the commit).
        result = super()._SyncObj__doApplyCommand(command)
        if self._tq_on_membership is not None and command[:1] == _MEMBERSHIP:
            try:
                request = pickle.loads(command[1:])  # noqa: S301 (our own journal, see below)
                self._tq_on_membership(int(self.raftLastApplied) + 1, request[0], str(request[1]))
            except Exception:  # recording the members must never stop the log
                log.exception("cluster.members_record_failed")
        return result

    def _onTick(self, timeToWait: float = 0.0) -> None:
        # Start of tick: entries a follower appended during the last poll become durable and
        # their held acks leave; the leader's own entries are durable before the commit count.
        now = time.monotonic()
        if self._tq_last_tick:
            gap = now - self._tq_last_tick
            self._tq_max_gap = max(self._tq_max_gap, gap)
            if gap > 0.3:
                log.warning("raft.tick_stall %.3fs", gap)
        self._tq_last_tick = now
        self._tq_flush()
        super()._onTick(timeToWait)


# --------------------------------------------------------------------------------------------
# State machine contract and the consumer
# --------------------------------------------------------------------------------------------


class ReplicatedMachine(Protocol):
    """What RaftLog drives. Every method runs in the asyncio loop thread."""

    def applied_index(self) -> int:
        """Highest Raft index already reflected in the state (0 for a fresh/in-memory one)."""
        ...

    def apply(self, index: int, entry: bytes) -> Any:
        """Apply one committed entry. Should not raise (RaftLog catches and records it)."""
        ...

    def snapshot(self) -> bytes:
        """State as of ``applied_index()`` (which RaftLog guarantees is the snapshot index).
        A machine may offer ``snapshot_begin() -> Callable[[BinaryIO], None]`` instead: capture
        in the loop, then write the state into the snapshot file from another thread, never
        whole in memory (ReplicatedState does)."""
        ...

    def restore(self, blob: bytes) -> None:
        """Replace the state by a snapshot; ``applied_index()`` then reports its index. A machine
        may offer ``restore_from(f: BinaryIO)`` too, which reads it from the file instead."""
        ...


class ApplyFailed(RaftError):
    code = "APPLY"


_SNAP_MAGIC = b"tqsnap3\n"
_SNAP_TRAILER = struct.Struct("<8sQI")  # magic, length of the state, its crc32


class SnapshotCorrupt(RaftError):
    code = "SNAPSHOT"


class _Sealing:
    """A file the machine's state is written into, counting its bytes and their CRC."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.length = 0
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.length += len(data)
        return self._f.write(data)


def _check_sealed(f: BinaryIO, offset: int, name: str) -> None:
    """Raise SnapshotCorrupt unless the state after ``offset`` is whole: pysyncobj writes a
    received snapshot without fsync, so a crash can leave it cut short, and a tar cut at a
    member boundary is a valid, shorter tar (an empty store installed without a word)."""
    size = os.fstat(f.fileno()).st_size
    if size - offset < _SNAP_TRAILER.size:
        raise SnapshotCorrupt(f"{name}: snapshot cut short ({size} bytes)")
    f.seek(size - _SNAP_TRAILER.size)
    magic, length, crc = _SNAP_TRAILER.unpack(f.read(_SNAP_TRAILER.size))
    if magic != _SNAP_MAGIC or offset + length + _SNAP_TRAILER.size != size:
        raise SnapshotCorrupt(f"{name}: snapshot cut short or damaged (no valid trailer)")
    f.seek(offset)
    seen, left = 0, length
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise SnapshotCorrupt(f"{name}: snapshot cut short")
        seen = zlib.crc32(chunk, seen)
        left -= len(chunk)
    if seen != crc:
        raise SnapshotCorrupt(f"{name}: snapshot damaged (CRC mismatch)")
    f.seek(offset)


class _SnapshotStarted(Exception):
    """Raised by the serializer once a snapshot is under way (see _serialize_in_raft_thread)."""


@dataclass
class _SnapshotJob:
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    index: int
    result: Any


class _Consumer(SyncObjConsumer):
    def __init__(self, owner: RaftLog) -> None:
        self._owner = owner  # set before SyncObjConsumer.__init__: never serialized
        super().__init__()

    @replicated
    def apply_entry(self, entry: bytes) -> int:
        """Runs in the Raft thread (syncobj.py:718 -> :907): hand over, never apply here."""
        return self._owner._committed_in_raft_thread(entry)


# --------------------------------------------------------------------------------------------
# RaftLog
# --------------------------------------------------------------------------------------------


def _endpoint(addr: str) -> tuple[frozenset[str], str]:
    """The IP addresses a ``host:port`` names, and its port (the host itself if it does not
    resolve)."""
    host, _, port = addr.rpartition(":")
    try:
        ips = frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except (OSError, UnicodeError):
        ips = frozenset([host])
    return ips or frozenset([host]), port


def _other_peers(self_addr: str, peers: list[str], *, warn: bool = True) -> list[str]:
    """``peers`` without this node and without repeats, by what the addresses resolve to: a
    node given itself as ``localhost:PORT`` beside ``127.0.0.1:PORT`` counted itself as one
    more member it could never reach (it then could not win an election with a peer down)."""
    me = _endpoint(self_addr)
    seen: list[tuple[frozenset[str], str]] = [me]
    out: list[str] = []
    for peer in peers:
        ips, port = _endpoint(peer)
        if any(port == p and ips & known for known, p in seen):
            if peer != self_addr and warn:
                log.warning("cluster.peer_ignored %s: names this node or an earlier peer", peer)
            continue
        seen.append((ips, port))
        out.append(peer)
    return out


MEMBERS_FILE = "members.json"


def raft_dir(data_dir: str) -> str:
    """Where a node keeps its Raft journal, snapshot and member record."""
    return os.path.join(data_dir, "raft")


def _change_members(members: set[str], op: str, addr: str) -> None:
    """A membership entry's effect on a member set (``add``/``rem``, as pysyncobj names them)."""
    if op == "add":
        members.add(addr)
    elif op == "rem":
        members.discard(addr)


def check_members(directory: str, self_addr: str, peers: list[str]) -> tuple[list[str], int] | None:
    """Refuse to start with other members than this node's Raft data (in ``directory``)
    belongs to: raise ``MembersMismatch``, naming both sets. Returns the member record (sorted
    members, index of the entry it was recorded at), or None when there is none yet: no Raft
    data (a first start) or data from a tq that did not record members.

    pysyncobj takes its configuration from the constructor (``--peers``) and only then replays
    membership changes (and a snapshot's member set). A follower restarted with ``--peers ""``
    on its data dir became a one-member cluster: it elected itself at a higher term,
    acknowledged writes alone, and on rejoining its log replaced entries the real majority had
    acknowledged. So the member set is recorded at the first start and again at every
    committed ``cluster add/remove`` (and snapshot installed), and a later start must name the
    same set, or the set after a membership change its journal holds but has not applied yet
    (the node stopped before that entry committed here). The order of ``--peers``, repeats and
    aliases of this node do not matter."""
    given = sorted({self_addr, *_other_peers(self_addr, peers, warn=False)})
    path = os.path.join(directory, MEMBERS_FILE)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
        members = sorted(str(m) for m in record["members"])
        index = int(record.get("index", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MembersMismatch(f"cannot read the member record {path}: {exc}") from exc
    if given == members:
        return members, index
    accepted = [members]
    journal = os.path.join(directory, "raft.journal")
    try:
        with open(journal, "rb") as f:
            entries = DurableJournal.parse(f.read(), journal)[0]
    except (FileNotFoundError, JournalError):
        entries = []
    current = set(members)
    for payload, idx, _term in entries:
        if idx > index and payload[:1] == _MEMBERSHIP:
            # our own journal: pysyncobj pickles membership entries (see the snapshot note)
            request = pickle.loads(payload[1:])  # noqa: S301
            _change_members(current, request[0], str(request[1]))
            accepted.append(sorted(current))
    if given in accepted:
        return members, index
    also = "".join(f" or {','.join(a)}" for a in accepted[1:] if a != members)
    raise MembersMismatch(
        f"--peers does not match the members this node's Raft data ({directory}) belongs to: "
        f"recorded {','.join(members)}{also}, given {','.join(given)} (this node is "
        f"{self_addr}); start it with --peers naming the recorded members, and change members "
        "with tq cluster add/remove"
    )


class RaftLog:
    def __init__(
        self,
        self_addr: str,
        peers: list[str],
        data_dir: str,
        sm: ReplicatedMachine,
        *,
        password: str | None,
        election_timeout: tuple[float, float] = (0.4, 1.2),
        compaction_min_entries: int = 5000,
        compaction_min_time: float = 300.0,
        # An entry larger than this travels in chunks, one chunk per append_entries, which
        # halved throughput with ~150 KB entries (500 tasks of 200-byte payloads): keep whole
        # tick batches in one message.
        append_entries_batch_bytes: int = 4 * 2**20,
        leader_fallback_timeout: float = 1.2,
        dynamic_membership: bool = True,
        bind_address: str | None = None,
        keep_next_index: bool = True,
        connection_retry: float = 0.5,
        snapshot_timeout: float = 30.0,
        on_role_change: Callable[[str], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.self_addr = self_addr
        self.peers = _other_peers(self_addr, peers)
        self.data_dir = data_dir
        self.sm = sm
        self._password = password
        self._election_timeout = election_timeout
        self._compaction = (compaction_min_entries, compaction_min_time)
        self._ae_batch = append_entries_batch_bytes
        self._leader_fallback = leader_fallback_timeout
        self._dynamic = dynamic_membership
        self._bind_address = bind_address or self_addr
        self._snapshot_timeout = snapshot_timeout
        self._keep_next_index = keep_next_index
        self._connection_retry = connection_retry
        self._on_role_change = on_role_change
        self._on_fatal_cb = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._obj: _TqSyncObj | None = None
        self.journal: DurableJournal | None = None
        self._consumer = _Consumer(self)
        self._applied = 0  # loop thread: last index reflected in sm
        self._last: tuple[int, Any] = (0, None)  # loop thread: (index, result) of last apply
        self._pending: set[asyncio.Future[Committed]] = set()
        self._closed = False
        self.fatal: BaseException | None = None
        self.ready = asyncio.Event()
        # counters
        self.applied_entries = 0
        self.skipped_entries = 0
        self.apply_errors = 0
        self.snapshots_taken = 0
        self.snapshots_restored = 0
        self.snapshot_max_s = 0.0  # longest snapshot, start to file renamed (off the Raft thread)
        self._snapshot_job: _SnapshotJob | None = None
        self.role_changes: list[tuple[float, str]] = []
        # The member set this node's Raft data belongs to (see check_members), and the index of
        # the entry (membership change or snapshot) it was last recorded at.
        self.members: list[str] = []
        self._members_index = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Call from the running loop. Binds the Raft port and starts the Raft thread."""
        self._loop = asyncio.get_running_loop()
        self._applied = self.sm.applied_index()
        os.makedirs(self.data_dir, exist_ok=True)
        # Before the journal exists: refuse other members than the data belongs to.
        record = check_members(self.data_dir, self.self_addr, self.peers)
        if record is None:
            if os.path.exists(os.path.join(self.data_dir, "raft.journal")):
                log.warning(
                    "cluster.members_recorded: the Raft data had no member record (an older "
                    "tq); recording the --peers given"
                )
            self._write_members(sorted({self.self_addr, *self.peers}), 0)
        else:
            self.members, self._members_index = record
        self.journal = DurableJournal(os.path.join(self.data_dir, "raft.journal"))
        lo, hi = self._election_timeout
        conf = SyncObjConf(
            password=self._password,
            journalFile=self.journal,  # picked up by the patched createJournal
            fullDumpFile=os.path.join(self.data_dir, "raft.snapshot"),
            serializer=self._serialize_in_raft_thread,
            serializeChecker=self._snapshot_state,
            deserializer=self._deserialize_in_raft_thread,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=self._ae_batch,
            raftMinTimeout=lo,
            raftMaxTimeout=hi,
            appendEntriesPeriod=min(0.1, lo / 4),
            connectionTimeout=max(3.5, hi),
            # default 5 s: a peer that came back stays unconnected to the node that should
            # dial it for up to 5 s, and with no link between the two survivors a failover
            # waits for it (elections need a connected peer, syncobj.py:635).
            connectionRetryTime=self._connection_retry,
            leaderFallbackTimeout=self._leader_fallback,
            commandsWaitLeader=False,
            logCompactionMinEntries=self._compaction[0],
            logCompactionMinTime=self._compaction[1],
            dynamicMembershipChange=self._dynamic,
            bindAddress=self._bind_address,
            # default 0 is "retry for ever, once a second, silently": a node whose Raft port
            # was taken reported ready and ran without Raft. See wait_bound().
            maxBindRetries=3,
            bindRetryTime=0.2,
            onStateChanged=self._state_changed_in_raft_thread,
            onReady=self._ready_in_raft_thread,
        )
        self._obj = _TqSyncObj(
            self.journal,
            self.self_addr,
            self.peers,
            conf=conf,
            consumers=[self._consumer],
            on_fatal=self._fatal_in_raft_thread,
            on_membership=self._membership_in_raft_thread,
            keep_next_index=self._keep_next_index,
        )

    # --- the member record -------------------------------------------------------------------

    def _write_members(self, members: list[str], index: int) -> None:
        record = {"v": 1, "members": members, "index": index}
        write_durably(os.path.join(self.data_dir, MEMBERS_FILE), json.dumps(record).encode())
        self.members, self._members_index = members, index

    def _membership_in_raft_thread(self, index: int, op: str, addr: str) -> None:
        """A membership change committed (``tq cluster add/remove``): record the new set, so
        the node restarts with the ``--peers`` that now describe the cluster. Entries replayed
        at start-up that the record already covers change nothing."""
        if index <= self._members_index:
            return
        current = set(self.members)
        _change_members(current, op, addr)
        self._write_members(sorted(current), index)
        log.info("cluster.members_recorded members=%s index=%d", ",".join(self.members), index)

    async def wait_bound(self) -> None:
        """Return once the Raft port is bound; raise ``OSError`` (as a taken client port does)
        if it cannot be."""
        assert self._obj is not None
        try:
            await asyncio.to_thread(self._obj.waitBinded)
        except SyncObjException:
            raise OSError(
                errno.EADDRINUSE, f"cannot bind the Raft port {self.self_addr} (in use?)"
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(Closed("raft log closed"))
        self._pending.clear()
        if self._obj is not None:
            await asyncio.to_thread(self._obj.destroy_synchronous)

    # --- Raft thread -> loop -----------------------------------------------------------------

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: the process is going away
            pass

    def _committed_in_raft_thread(self, entry: bytes) -> int:
        # syncobj.py:711-725: raftLastApplied is bumped right after this returns, so the index
        # of the entry being applied is raftLastApplied + 1.
        # _consumer._syncObj is set inside SyncObj.__init__ (syncobj.py:246) before the Raft
        # thread starts; self._obj only after the constructor returns, which can be after the
        # first tick replays the journal.
        index = int(self._consumer._syncObj.raftLastApplied) + 1
        self._call_in_loop(self._apply, index, entry)
        return index

    def _state_changed_in_raft_thread(self, old: int, new: int) -> None:
        self._call_in_loop(self._role_changed, time.monotonic(), ROLES.get(new, str(new)))

    def _ready_in_raft_thread(self) -> None:
        self._call_in_loop(self.ready.set)

    def _fatal_in_raft_thread(self, exc: BaseException) -> None:
        self._call_in_loop(self._fatal, exc)

    # --- loop thread -------------------------------------------------------------------------

    def _apply(self, index: int, entry: bytes) -> None:
        if index <= self._applied or self.fatal is not None:
            self.skipped_entries += 1
            return
        # (No contiguity check: no-op and membership entries never reach apply_entry.)
        try:
            result = self.sm.apply(index, entry)
        except StoreError as exc:
            # The disk, not the entry (full, I/O error): this node's memory may be ahead of its
            # store, and going on as if the entry had applied would make it diverge from the
            # others. It stops instead; restarted, it applies the entry again from the log.
            self.apply_errors += 1
            log.critical("raft.store_failed index=%d error=%s", index, exc)
            self._fatal(exc)
            return
        except Exception as exc:  # apply never raises into the log
            self.apply_errors += 1
            log.exception("raft.apply_failed index=%d", index)
            result = ApplyFailed(f"apply failed at {index}: {exc!r}")
        self._applied = index
        self._last = (index, result)
        self.applied_entries += 1

    def _role_changed(self, at: float, role: str) -> None:
        self.role_changes.append((at, role))
        if role != "leader" and self._pending:
            # Lost leadership (a higher term, or no quorum for leaderFallbackTimeout): without
            # this the proposals would wait for their timeout, or forever. The outcome is
            # unknown (a later leader may still commit them): clients retry, deduplicated.
            for fut in list(self._pending):
                if not fut.done():
                    fut.set_exception(
                        RaftNotLeader(
                            "leadership lost, outcome unknown",
                            leader=self.leader(),
                            reason="STEPPED_DOWN",
                        )
                    )
            self._pending.clear()
        if self._on_role_change is not None:
            self._on_role_change(role)

    def _fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(JournalError(str(exc)))
        self._pending.clear()
        if self._on_fatal_cb is not None:
            self._on_fatal_cb(exc)

    # --- proposals ---------------------------------------------------------------------------

    def leader(self) -> str | None:
        node = self._obj._getLeader() if self._obj is not None else None
        return node.address if node is not None else None

    def is_leader(self) -> bool:
        return self._obj is not None and self._obj._isLeader()

    def propose(self, entry: bytes, timeout: float | None = None) -> asyncio.Future[Committed]:
        """Replicate one entry. Resolves with ``Committed(index, sm result)`` once the entry is
        committed and applied here; fails with NotLeader (carrying the leader's address),
        ProposalTimeout, Overloaded, Closed or ApplyFailed."""
        assert self._loop is not None
        assert self._obj is not None
        loop = self._loop
        fut: asyncio.Future[Committed] = loop.create_future()
        if self._closed:
            fut.set_exception(Closed("raft log closed"))
            return fut
        if self.fatal is not None:
            fut.set_exception(JournalError(str(self.fatal)))
            return fut
        if not self._obj._isLeader():
            fut.set_exception(
                RaftNotLeader("not the leader", leader=self.leader(), reason="NOT_LEADER")
            )
            return fut
        self._pending.add(fut)

        def callback(res: Any, err: int) -> None:  # Raft thread (or caller's, on QUEUE_FULL)
            try:
                loop.call_soon_threadsafe(self._resolve, fut, res, err)
            except RuntimeError:
                pass

        self._consumer.apply_entry(entry, callback=callback)
        if timeout is not None:
            loop.call_later(timeout, self._time_out, fut)
        return fut

    def _resolve(self, fut: asyncio.Future[Committed], res: Any, err: int) -> None:
        self._pending.discard(fut)
        if fut.done():
            return
        if err == FAIL_REASON.SUCCESS:
            # The apply for this index was queued just before this call (same Raft-thread
            # iteration, syncobj.py:718-721) and the loop runs callbacks FIFO.
            index, result = self._last
            if index != res:
                result = None  # applied before (replay skip); no result to hand back
            if isinstance(result, ApplyFailed):
                fut.set_exception(result)
            else:
                fut.set_result(Committed(res, result))
        elif err == FAIL_REASON.QUEUE_FULL:
            fut.set_exception(Overloaded("raft command queue full", reason="QUEUE_FULL"))
        else:
            reason = FAIL_NAMES.get(err, str(err))
            fut.set_exception(
                RaftNotLeader(f"not committed: {reason}", leader=self.leader(), reason=reason)
            )

    def _time_out(self, fut: asyncio.Future[Committed]) -> None:
        self._pending.discard(fut)
        if not fut.done():
            fut.set_exception(
                ProposalTimeout("no outcome in time (maybe committed)", leader=self.leader())
            )

    # --- membership --------------------------------------------------------------------------

    def _membership(self, op: str, addr: str) -> asyncio.Future[None]:
        assert self._loop is not None
        assert self._obj is not None
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()

        def done(fut_: asyncio.Future[None], err: int) -> None:
            if fut_.done():
                return
            if err == FAIL_REASON.SUCCESS:
                fut_.set_result(None)
            else:
                fut_.set_exception(
                    RaftNotLeader(
                        f"{op} {addr}: {FAIL_NAMES.get(err, err)}",
                        leader=self.leader(),
                        reason=FAIL_NAMES.get(err, str(err)),
                    )
                )

        def callback(res: Any, err: int) -> None:
            loop.call_soon_threadsafe(done, fut, err)

        if op == "add":
            self._obj.addNodeToCluster(addr, callback=callback)
        else:
            self._obj.removeNodeFromCluster(addr, callback=callback)
        return fut

    def add_node(self, addr: str) -> asyncio.Future[None]:
        return self._membership("add", addr)

    def remove_node(self, addr: str) -> asyncio.Future[None]:
        return self._membership("remove", addr)

    # --- snapshots (Raft thread, blocking on the loop) ---------------------------------------

    def _run_in_loop(self, fn: Callable[[], Any]) -> Any:
        assert self._loop is not None
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if self._closed:  # the store may be closed already
                cf.set_exception(Closed("raft log closed"))
                return
            try:
                cf.set_result(fn())
            except BaseException as exc:
                cf.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        # Wait in slices: a node stopping joins this thread from the loop (destroy_synchronous),
        # so the loop will not run ``fn`` until we give up. Waiting the whole snapshot timeout
        # held a node SIGTERMed while it loaded its snapshot at start-up for 30 s.
        deadline = time.monotonic() + self._snapshot_timeout
        while True:
            try:
                return cf.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if self._closed:
                    raise Closed("raft log closed") from None
                if time.monotonic() > deadline:
                    raise

    def _serialize_in_raft_thread(self, file_name: str, data: Any) -> None:
        # serializer.py:86-87: called as serializer(fullDumpFile + '.tmp', data[1:]) with
        # data[1:] == (last applied entry, the entry before it, set of cluster nodes)
        # (syncobj.py:1455-1470), synchronously in the Raft thread (no fork with a custom
        # serializer, serializer.py:16).
        #
        # This only starts the snapshot: waiting here for it (a RocksDB checkpoint, a tar of the
        # whole store, pickle, fsync) stalled the Raft thread for seconds with a 65 MB store,
        # past the election timeout, on every node at once. The state is captured in the loop
        # (flush_wal + checkpoint: ReplicatedState.snapshot_begin), packed and written in a
        # thread of its own, and renamed over fullDumpFile there; ``_snapshot_state`` (the
        # serializeChecker) reports SERIALIZING until then, and pysyncobj compacts the journal
        # only on its SUCCESS. Raising keeps pysyncobj's Serializer from renaming the .tmp it
        # expects us to have written (serializer.py:88-94: it records a failure, which the
        # checker's answer replaces).
        target = data[0][1]
        assert self._loop is not None
        job = _SnapshotJob(time.monotonic())
        self._snapshot_job = job
        final = file_name[: -len(".tmp")] if file_name.endswith(".tmp") else file_name + ".tq"

        def finish(pack: Callable[[BinaryIO], None]) -> None:  # snapshot thread
            try:
                fd = os.open(file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # payloads
                with os.fdopen(fd, "wb") as f:
                    # Format 3: a small pickled header, the machine's state streamed after it,
                    # and a trailer with the state's length and CRC (a tar cut at a member
                    # boundary reads as a shorter, valid tar). Format 2 had no trailer; format
                    # 1 pickled the state as one bytes object: the whole store in memory at
                    # once (twice, on the node that received it). Both are still read.
                    pickle.dump({"v": 3, "index": target, "raft": data}, f, protocol=4)
                    sealing = _Sealing(f)
                    pack(cast(BinaryIO, sealing))  # tarfile only writes to it
                    f.write(_SNAP_TRAILER.pack(_SNAP_MAGIC, sealing.length, sealing.crc))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(file_name, final)
                fsync_dir(os.path.dirname(os.path.abspath(final)))
            except BaseException as exc:
                log.exception("raft.snapshot_failed index=%d", target)
                job.error = exc
            job.done.set()

        def begin() -> None:  # loop thread
            # FIFO puts this after every apply up to target (later entries are handed over
            # after this call). applied_index() may be lower than target (no-op entries are not
            # handed to us) or higher (tq's store recovered ahead of the journal replay): the
            # snapshot carries the state machine's own index and the receiver skips entries it
            # already holds.
            try:
                if self._closed:  # the store may be closed already
                    raise Closed("raft log closed")
                begin_ = getattr(self.sm, "snapshot_begin", None)
                if begin_ is not None:
                    pack: Callable[[BinaryIO], None] = begin_()
                else:
                    blob = self.sm.snapshot()

                    def pack(f: BinaryIO) -> None:
                        f.write(blob)

            except BaseException as exc:
                log.exception("raft.snapshot_failed index=%d", target)
                job.error = exc
                job.done.set()
                return
            threading.Thread(
                target=finish, args=(pack,), name="tq-raft-snapshot", daemon=True
            ).start()

        try:
            self._loop.call_soon_threadsafe(begin)
        except RuntimeError as exc:  # the loop is closed: the process is going away
            job.error = exc
            job.done.set()
        raise _SnapshotStarted(f"snapshot at {target} started")

    def _snapshot_state(self) -> int:
        """pysyncobj's serializeChecker (Raft thread): SERIALIZING while a snapshot is being
        made, then SUCCESS or FAILED once, then NOT_SERIALIZING."""
        job = self._snapshot_job
        if job is None:
            return int(SERIALIZER_STATE.NOT_SERIALIZING)
        if not job.done.is_set():
            return int(SERIALIZER_STATE.SERIALIZING)
        self._snapshot_job = None
        if job.error is not None:
            return int(SERIALIZER_STATE.FAILED)
        self.snapshots_taken += 1
        self.snapshot_max_s = max(self.snapshot_max_s, time.monotonic() - job.started)
        return int(SERIALIZER_STATE.SUCCESS)

    def _deserialize_in_raft_thread(self, file_name: str) -> Any:
        # serializer.py:110-111: must return data[1:] as given to the serializer. Called at
        # startup (syncobj.py:624-627) and when a leader installs a snapshot (:1022-1024).
        with open(file_name, "rb") as f:
            # pysyncobj's own part of a snapshot (its node objects) is pickled, as all its peer
            # traffic is: the file only ever comes from this node or from a peer authenticated
            # by the cluster secret (Fernet). Keep the Raft port private (DESIGN.md).
            d = pickle.load(f)  # noqa: S301
            offset = f.tell()  # formats 2 and 3: the machine's state follows the header
            if d.get("v", 1) >= 3:
                _check_sealed(f, offset, file_name)  # before anything replaces the store
            os.fchmod(f.fileno(), 0o600)  # pysyncobj writes a received one with its umask
            os.fsync(f.fileno())  # received snapshots are written without fsync
        index = d["index"]
        if index > self._members_index:
            # A snapshot replaces the membership entries it covers: its member set is the record.
            try:
                self._write_members(sorted(str(n.address) for n in d["raft"][2]), index)
            except Exception:
                log.exception("cluster.members_record_failed")

        def restore() -> None:
            if index > self._applied:
                if d.get("v", 1) == 1:
                    self.sm.restore(d["sm"])
                else:
                    with open(file_name, "rb") as f:
                        f.seek(offset)
                        restore_from = getattr(self.sm, "restore_from", None)
                        if restore_from is not None:
                            restore_from(f)
                        else:
                            self.sm.restore(f.read())
                self._applied = self.sm.applied_index()
                self.snapshots_restored += 1

        self._run_in_loop(restore)
        return d["raft"]

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self._obj is not None
        st: dict[str, Any] = {}
        others: list[Any] = []
        for _ in range(10):  # getStatus iterates dicts the Raft thread mutates
            try:
                st = self._obj.getStatus()
                others = list(self._obj.otherNodes)
                break
            except RuntimeError:
                continue
        leader = st.get("leader")
        peers = {}
        transport = getattr(self._obj, "_tq_transport", None)
        contact: dict[str, float] = dict(transport.tq_last_contact) if transport else {}
        now = time.monotonic()
        for node in others:
            seen = contact.get(node.address)
            peers[node.address] = {
                "connected": st.get("partner_node_status_server_" + node.id) == 2,
                "match_index": st.get("match_idx_server_" + node.id),
                "next_index": st.get("next_node_idx_server_" + node.id),
                "last_contact_s": round(now - seen, 3) if seen is not None else None,
            }
        auth = dict(transport.tq_auth_failures) if transport else {}
        j = self.journal
        return {
            "self": self.self_addr,
            "role": ROLES.get(st.get("state", -1), "?"),
            "leader": leader.address if leader is not None else None,
            "term": st.get("raft_term"),
            "commit_index": st.get("commit_idx"),
            "raft_last_applied": st.get("last_applied"),
            "applied_index": self._applied,
            "leader_commit_index": st.get("leader_commit_idx"),
            "has_quorum": st.get("has_quorum"),
            "members": list(self.members),
            "ready": self.ready.is_set(),
            "log_len": st.get("log_len"),
            "peers": peers,
            "peer_auth_failures": {
                peer: {
                    "count": e["count"],
                    "last_s": round(now - e["last"], 3),
                    "how": e["how"],
                }
                for peer, e in auth.items()
            },
            "journal": {
                "syncs": j.syncs if j else 0,
                "synced_entries": j.synced_entries if j else 0,
                "sync_seconds": round(j.sync_seconds, 4) if j else 0,
                "opened_entries": j.opened_entries if j else 0,
                "truncated_tail_bytes": j.truncated_tail_bytes if j else 0,
                "readopted_entries": j.readopted_entries if j else 0,
            },
            "applied_entries": self.applied_entries,
            "skipped_entries": self.skipped_entries,
            "apply_errors": self.apply_errors,
            "snapshots_taken": self.snapshots_taken,
            "snapshots_restored": self.snapshots_restored,
            "snapshot_max_s": round(self.snapshot_max_s, 4),
            "fatal": repr(self.fatal) if self.fatal else None,
            "role_changes": self.role_changes[-10:],  # (time.monotonic(), role)
            "max_tick_gap_s": round(self._obj._tq_max_gap, 3),
        }


# --------------------------------------------------------------------------------------------
# tq's side: the state machine adapter and the command log the broker core uses
# --------------------------------------------------------------------------------------------

_batch_enc = msgspec.msgpack.Encoder()
_batch_dec = msgspec.msgpack.Decoder(CommandBatch)


class ReplicatedState:
    """tq's StateMachine and Store behind RaftLog's state-machine contract.

    Every node applies every committed entry here, in log order, in the loop thread. The applied
    index is written in the same RocksDB batch as the entry's effects, so the replay pysyncobj
    does at every start skips exactly what the store already holds. Snapshots are RocksDB
    checkpoints (a tar of the checkpoint directory), never pickled memory."""

    def __init__(
        self, sm: TqStateMachine, store: Store, on_applied: Callable[[ApplyResult], None]
    ) -> None:
        self.sm = sm
        self.store = store
        self.on_applied = on_applied
        self.own_settings = sm.settings  # this node's flags: stamped on what it proposes

    def applied_index(self) -> int:
        return self.sm.applied_index

    def apply(self, index: int, entry: bytes) -> ApplyResult:
        try:
            batch = _batch_dec.decode(entry)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            # A bad entry still applies (as nothing), so every node stays in step.
            log.error("cluster.bad_entry index=%d error=%s", index, exc)
            return self.sm.apply(0, [], applied_index=index)
        # The accepting leader's settings, not this node's flags (CommandBatch says why).
        self.sm.settings = batch.settings or self.own_settings
        result = self.sm.apply(batch.now_ms, batch.commands, applied_index=index)
        self.on_applied(result)
        return result

    def snapshot(self) -> bytes:
        buf = io.BytesIO()
        self.snapshot_begin()(buf)
        return buf.getvalue()

    def snapshot_begin(self) -> Callable[[BinaryIO], None]:
        """Capture the state now (loop thread): returns what writes it into the snapshot file,
        to run in another thread (a tar of the whole store took seconds on the loop). The tar
        is streamed into the file, never held in memory: that cost as much memory as the store
        is big, on every node at once (they compact at the same log length)."""
        # The journal is about to be compacted: what it held must be durable in the store.
        self.store.flush_wal()
        # Beside the store, not in /tmp: a checkpoint is hard links only on the same filesystem
        # (elsewhere RocksDB copies every file). One left by a node killed while packing would
        # keep compacted-away files alive: the previous snapshot is done (pysyncobj starts one
        # at a time), so any such directory is stale.
        _remove_stale(self.store.parent, "tq-snap-")
        tmp = tempfile.mkdtemp(prefix="tq-snap-", dir=self.store.parent)
        checkpoint = os.path.join(tmp, "store")
        try:
            self.store.checkpoint(checkpoint)  # hard links: later writes do not change it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        def pack(f: BinaryIO) -> None:
            try:
                with tarfile.open(fileobj=f, mode="w|") as tar:
                    tar.add(checkpoint, arcname="store")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return pack

    def restore(self, blob: bytes) -> None:
        self.restore_from(io.BytesIO(blob))

    def restore_from(self, f: BinaryIO) -> None:
        """Replace the store by the snapshot read from ``f`` (a tar stream, read as it comes)."""
        _remove_stale(self.store.parent, "tq-restore-")  # (one restore runs at a time)
        with tempfile.TemporaryDirectory(prefix="tq-restore-", dir=self.store.parent) as tmp:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                tar.extractall(tmp, filter="data")
            self.store.replace_with(os.path.join(tmp, "store"))
        self.sm.reset()
        self.sm.recover()
        log.info("cluster.snapshot_restored applied_index=%d", self.sm.applied_index)


def _remove_stale(parent: str, prefix: str) -> None:
    """Remove the working directories (``prefix*``) a node killed mid-snapshot left in
    ``parent``: they hold hard links that keep compacted-away store files alive."""
    for stale in glob.glob(os.path.join(glob.escape(parent), prefix + "*")):
        shutil.rmtree(stale, ignore_errors=True)


class ClusterLog:
    """The broker core's command log in cluster mode: one Raft entry per tick's batch.

    Only the leader appends; a command is acknowledged when its entry is committed by a majority
    (each of which fsync'd it into its journal) and applied here."""

    def __init__(
        self,
        store: Store,
        sm: TqStateMachine,
        on_fatal: Callable[[BaseException], None],
        on_applied: Callable[[ApplyResult], None],
        *,
        node_id: str,
        raft_address: str,
        peers: list[str],
        client_address: str,
        data_dir: str,
        password: str | None,
        bind_address: str | None = None,
        compaction_min_entries: int = 5000,
        on_role_change: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.raft_address = raft_address
        self.client_address = client_address
        self._sm = sm
        self._on_role_change_cb = on_role_change
        self.state = ReplicatedState(sm, store, on_applied)
        self.raft = RaftLog(
            raft_address,
            peers,
            raft_dir(data_dir),
            self.state,
            password=password,
            bind_address=bind_address,
            compaction_min_entries=compaction_min_entries,
            on_role_change=self._role_changed,
            on_fatal=on_fatal,
        )
        self.flushes = 0
        self.flushed_commits = 0
        # A node elected leader knows every committed entry but may not have applied them yet
        # (Raft: it learns which ones are committed only once an entry of its own term is): it
        # answered status/list/wait from that state, and an acknowledged task read as
        # TASK_NOT_FOUND right after a failover. It serves once the Announce it proposes on
        # election is applied here (log order: everything before it is applied too).
        self._lead_ready = False
        self._lead_gen = 0  # bumped at every role change: a late Announce reply is ignored
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.raft.start()

    async def wait_bound(self) -> None:
        await self.raft.wait_bound()

    @property
    def is_leader(self) -> bool:
        """Leader *and* caught up: what the core serves on (see ``_lead_ready``)."""
        return self._lead_ready and self.raft.is_leader() and self.raft.fatal is None

    def leader_client(self) -> str | None:
        leader = self.raft.leader()
        return None if leader is None else self._sm.nodes.get(leader)

    def append(
        self,
        now_ms: int,
        commands: list[Command],
        done: Callable[[ApplyResult | BaseException], None],
    ) -> None:
        if not self.is_leader:
            done(self.not_leader())
            return
        fut = self.raft.propose(
            _batch_enc.encode(CommandBatch(now_ms, commands, self.state.own_settings))
        )

        def finished(f: asyncio.Future[Committed]) -> None:
            exc = f.exception()
            if exc is None:
                result = f.result().result
                if isinstance(result, ApplyResult):
                    done(result)
                else:  # applied before (a replay): the outcome of each command is unknown
                    done(InternalError("entry applied without a result; retry"))
            elif isinstance(exc, RaftNotLeader):
                refusal = self.not_leader(exc.reason)
                if exc.reason == "STEPPED_DOWN":  # taken, then leadership lost: may yet commit
                    refusal = OutcomeUnknown(refusal.message, leader=refusal.leader)
                done(refusal)
            else:
                done(TqError(f"replication failed: {exc}"))

        fut.add_done_callback(finished)

    def not_leader(self, reason: str = "") -> NotLeader:
        if self.raft.is_leader() and not self._lead_ready:
            # Elected but not caught up: naming itself would send clients straight back here in
            # a tight loop. With no leader named they try the other addresses, pausing a little
            # (tq/client/aio.py), and come back once it serves: one commit round trip later.
            return NotLeader("this node was just elected and is catching up; retry", leader=None)
        leader = self.leader_client()
        text = "this node is not the leader" + (f" ({reason})" if reason else "")
        return NotLeader(text + (f"; leader is {leader}" if leader else ""), leader=leader)

    def when_durable(self, cb: Callable[[BaseException | None], None]) -> None:
        cb(None)  # applied here means committed by a majority: nothing left to wait for

    def kick(self) -> None:
        pass

    def close(self) -> None:
        obj = self.raft._obj
        self.raft._closed = True
        if obj is not None:
            obj.destroy_synchronous()

    def _role_changed(self, role: str) -> None:
        log.info("cluster.role_changed node=%s role=%s", self.node_id, role)
        self._lead_gen += 1
        self._lead_ready = False
        if role == "leader":
            # The core hears "leader" (and arms its timers) once this node serves: _announced.
            self._announce(self._lead_gen)
            return
        if self._on_role_change_cb is not None:
            self._on_role_change_cb(role)

    def _announce(self, gen: int) -> None:
        """Propose the Announce of this term: it tells every node where clients should go now,
        and once it is applied here this node has applied every entry committed before it."""
        if gen != self._lead_gen or not self.raft.is_leader() or self.raft.fatal is not None:
            return
        batch = CommandBatch(
            int(time.time() * 1000),
            [Announce(self.raft_address, self.client_address, self.node_id)],
            self.state.own_settings,
        )
        self.raft.propose(_batch_enc.encode(batch)).add_done_callback(
            lambda f: self._announced(gen, f)
        )

    def _announced(self, gen: int, fut: asyncio.Future[Committed]) -> None:
        if gen != self._lead_gen:
            return  # the role changed since: that change decides
        if fut.exception() is None:
            if not self.raft.is_leader():
                return  # stepped down meanwhile; its role change is on its way
            self._lead_ready = True
            log.info("cluster.leader_ready node=%s", self.node_id)
            if self._on_role_change_cb is not None:
                self._on_role_change_cb("leader")
            return
        # Not committed (queue full, an apply error) while still leading: try again shortly,
        # or this node would lead without ever serving. Losing leadership bumps the gen.
        if self._loop is not None and not self.raft._closed:
            self._loop.call_later(0.05, self._announce, gen)

    def add_node(self, address: str) -> asyncio.Future[None]:
        return self.raft.add_node(address)

    def remove_node(self, address: str) -> asyncio.Future[None]:
        return self.raft.remove_node(address)

    def status(self) -> dict[str, Any]:
        st = self.raft.status()
        leader = st.get("leader")
        return {
            "node_id": self.node_id,
            "raft_address": self.raft_address,
            "client_address": self.client_address,
            "role": st.get("role"),
            "leader": leader,
            "leader_client": self._sm.nodes.get(leader) if leader else None,
            "term": st.get("term"),
            "commit_index": st.get("commit_index"),
            "applied_index": st.get("applied_index"),
            "has_quorum": st.get("has_quorum"),
            # a leader serves once an entry of its term is applied here (False on followers)
            "serving": self.is_leader,
            "members": st.get("members"),  # the member set recorded in the data dir
            "peers": {
                addr: {
                    "connected": p.get("connected"),
                    "match_index": p.get("match_index"),
                    "last_contact_s": p.get("last_contact_s"),
                }
                for addr, p in st.get("peers", {}).items()
            },
            # peers whose Raft traffic did not authenticate (a different --raft-secret-file?)
            "peer_auth_failures": st.get("peer_auth_failures"),
            "journal": st.get("journal"),
            "snapshots_taken": st.get("snapshots_taken"),
            "snapshots_restored": st.get("snapshots_restored"),
        }


__all__ = [
    "ApplyFailed",
    "Closed",
    "ClusterLog",
    "Committed",
    "DurableJournal",
    "JournalError",
    "MembersMismatch",
    "Overloaded",
    "ProposalTimeout",
    "RaftError",
    "RaftLog",
    "RaftNotLeader",
    "ReplicatedMachine",
    "ReplicatedState",
    "check_members",
    "raft_dir",
]
