"""The only module that imports rocksdict.

Durability contract (FACTS.md): ``write()`` applies a batch with ``sync=False`` on the event loop
(it holds the GIL, so it must be cheap); the durable copy of every batch is a journal the caller
keeps (tq/store/journal.py for a single node, the Raft journal in a cluster). ``flush_wal()``
makes everything written so far durable with one fsync and releases the GIL: the broker calls it
in its writer thread when the journal is about to forget batches (checkpoint, snapshot).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any, cast

import msgspec
import rocksdict

from tq.errors import TqError
from tq.store.keys import CF

_MISSING: Any = object()
_BY_CODE = list(CF)  # a column family by its number in an effects record (format-2 journals)
_effects_dec = msgspec.msgpack.Decoder(list[tuple[int, bytes, bytes | None]])
CF_WRITE_BUFFER_BYTES = 8 * 1024 * 1024
DB_WRITE_BUFFER_BYTES = 48 * 1024 * 1024
MAX_WAL_BYTES = 64 * 1024 * 1024
SCAN_READAHEAD_BYTES = 2 * 1024 * 1024


def _cf_options() -> Any:
    opts = rocksdict.Options(raw_mode=True)
    opts.set_write_buffer_size(CF_WRITE_BUFFER_BYTES)
    opts.set_max_write_buffer_number(3)
    # Every submit asks "does this id exist?" and the answer is almost always no: bloom filters
    # in the SST files answer that without reading blocks. (A memtable bloom filter was measured
    # too: it made every write dearer than the lookups it saved.)
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    return opts


class StoreError(TqError):
    code = "STORE"


class Batch:
    """One atomic write across column families, readable before it is written.

    The state machine reads what it wrote earlier in the same apply (a task submitted and claimed
    in one tick), so puts and deletes are mirrored in a small overlay consulted by ``Store.get``.
    """

    __slots__ = ("_handles", "_n", "_overlays", "_wb")

    def __init__(self, handles: dict[CF, Any]) -> None:
        self._wb = rocksdict.WriteBatch(raw_mode=True)
        self._handles = handles
        # One dict per column family: no (cf, key) tuple to build and hash per write.
        self._overlays: dict[CF, dict[bytes, bytes | None]] = {cf: {} for cf in handles}
        self._n = 0

    def put(self, cf: CF, key: bytes, value: bytes) -> None:
        self._wb.put(key, value, self._handles[cf])
        self._overlays[cf][key] = value
        self._n += 1

    def delete(self, cf: CF, key: bytes) -> None:
        self._wb.delete(key, self._handles[cf])
        self._overlays[cf][key] = None
        self._n += 1

    def writer(self, cf: CF) -> tuple[Any, Any, dict[bytes, bytes | None]]:
        """For hot loops: the raw put function, the family's handle and its overlay, so a caller
        can do ``put(key, value, handle); overlay[key] = value`` without method calls, then
        report how many writes it made with ``count``."""
        return self._wb.put, self._handles[cf], self._overlays[cf]

    def count(self, n: int) -> None:
        self._n += n

    def lookup(self, cf: CF, key: bytes) -> bytes | Any | None:
        """The value written in this batch, ``None`` if deleted here, ``_MISSING`` if untouched."""
        return self._overlays[cf].get(key, _MISSING)

    def __len__(self) -> int:
        return self._n

    @property
    def touched(self) -> bool:
        return self._n > 0


class Store:
    """RocksDB in raw mode with one column family per task state plus ``ids`` and ``meta``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: Any = None
        self._handles: dict[CF, Any] = {}
        self._cfs: dict[CF, Any] = {}
        self._wo: Any = None

    def open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
        opts.increase_parallelism(2)
        # Small memtables under one shared cap: bounded broker RSS (1M pending tasks fit in
        # well under 250 MB), and little WAL to replay after a crash (fast recovery).
        opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES)
        opts.set_max_total_wal_size(MAX_WAL_BYTES)
        cf_opts = {cf.value: _cf_options() for cf in CF}
        try:
            self._db = rocksdict.Rdict(self.path, opts, column_families=cf_opts)
        except Exception as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        for cf in CF:
            self._handles[cf] = self._db.get_column_family_handle(cf.value)
            self._cfs[cf] = self._db.get_column_family(cf.value)
        self._wo = rocksdict.WriteOptions()
        self._wo.sync = False

    # --- writes ----------------------------------------------------------------------------------

    def batch(self) -> Batch:
        return Batch(self._handles)

    def write(self, batch: Batch) -> None:
        """Apply atomically, not yet durable: the journal (or ``flush_wal``) makes it so."""
        if len(batch):
            try:
                self._db.write(batch._wb, self._wo)
            except Exception as exc:  # rocksdict raises plain Exception("IO error: ...")
                raise StoreError(f"store write failed: {exc}") from exc

    def write_effects(self, payload: bytes) -> None:
        """Write back a batch's effects, ``(cf number, key, value or None)`` as a format-2
        journal holds them (tq/broker/log.py). Not yet durable, like ``write``. Putting back what
        the store already holds is harmless: every effect is a whole value or a delete."""
        wb = rocksdict.WriteBatch(raw_mode=True)
        handles = self._handles
        for code, key, value in _effects_dec.decode(payload):
            handle = handles[_BY_CODE[code]]
            if value is None:
                wb.delete(key, handle)
            else:
                wb.put(key, value, handle)
        self._db.write(wb, self._wo)

    def flush_wal(self) -> None:
        """fsync the WAL: everything written before this call is durable when it returns."""
        self._db.flush_wal(True)

    # --- reads -----------------------------------------------------------------------------------

    def get(self, cf: CF, key: bytes, batch: Batch | None = None) -> bytes | None:
        if batch is not None:
            hit = batch.lookup(cf, key)
            if hit is not _MISSING:
                return cast(bytes | None, hit)
        try:
            value: bytes | None = self._cfs[cf].get(key)
        except Exception as exc:  # a read error of the disk, as rocksdict reports it
            raise StoreError(f"store read failed: {exc}") from exc
        return value

    def exists_many(self, cf: CF, keys: list[bytes], batch: Batch | None = None) -> list[bool]:
        """One multi-get for a whole batch (dedup on submit): far cheaper than a get per key."""
        if len(keys) == 1:  # a multi-get costs more than a get for one key
            found = [self._cfs[cf].get(keys[0]) is not None]
        else:
            found = [v is not None for v in self._cfs[cf].get(keys)]
        if batch is not None and batch.touched:
            for i, key in enumerate(keys):
                hit = batch.lookup(cf, key)
                if hit is not _MISSING:
                    found[i] = hit is not None
        return found

    def keys(self, cf: CF, start: bytes | None = None, backwards: bool = False) -> Iterator[bytes]:
        # Seek + our own stop condition: rocksdict's lower-bound option is broken (FACTS.md).
        # rocksdict's own iterator, not a generator around it (one Python frame less a key).
        keys: Iterator[bytes] = self._cfs[cf].keys(backwards=backwards, from_key=start)
        return keys

    def scan_keys(self, cf: CF) -> Iterator[bytes]:
        """Every key of ``cf``, for a one-off read of the whole family (recovery): read ahead in
        2 MiB reads, and not kept in the block cache, which holds what claims read next. A
        million pending keys took 0.37-0.40 s so against 0.53-0.65 s with ``keys`` here."""
        opts = rocksdict.ReadOptions()
        opts.set_readahead_size(SCAN_READAHEAD_BYTES)
        opts.fill_cache(False)  # type: ignore[call-arg]  # (rocksdict's stub drops the argument)
        keys: Iterator[bytes] = self._cfs[cf].keys(read_opt=opts)
        return keys

    def items(
        self, cf: CF, start: bytes | None = None, backwards: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        yield from self._cfs[cf].items(backwards=backwards, from_key=start)

    def checkpoint(self, dest: str) -> None:
        rocksdict.Checkpoint(self._db).create_checkpoint(dest)

    @property
    def parent(self) -> str:
        """The directory holding the store's directory (same filesystem: renames are atomic)."""
        return os.path.dirname(os.path.abspath(self.path))

    def replace_with(self, checkpoint_dir: str) -> None:
        """Swap in a checkpoint (a snapshot from the Raft leader) for the whole store."""
        self.close()
        old = self.path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.path):
            os.rename(self.path, old)
        os.rename(checkpoint_dir, self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.open()

    def close(self) -> None:
        """Flush every column family: ``close()`` alone flushes only the default one."""
        if self._db is None:
            return
        try:
            self._db.flush_wal(True)
            for cf in CF:
                self._cfs[cf].flush()
        finally:
            self._cfs.clear()
            self._handles.clear()
            self._db.close()
            self._db = None
