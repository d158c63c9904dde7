"""A Raft snapshot is streamed: the store's tar goes straight into the snapshot file and comes
back out of it, never whole in memory (it took as much memory as the store is big, on every node
at once, since they compact at the same log length). Snapshot files of format 1 (the state
pickled as one bytes object) still restore."""

from __future__ import annotations

import asyncio
import pickle
import random
import tracemalloc
from pathlib import Path

import pytest
import tq.broker.cluster as cluster_module
from tq.broker.cluster import RaftLog, ReplicatedState, SnapshotCorrupt
from tq.broker.commands import Submit
from tq.broker.state import ApplyResult, StateMachine
from tq.model import RetryPolicy
from tq.protocol.messages import TaskSpec
from tq.store import Store

from tests.broker.support import dump_store

MB = 1024 * 1024
RAFT_DATA = ((b"\x01", 5, 1), (b"\x01", 4, 1), set())  # pysyncobj's part: entries 5, 4; no peers


def _ignore(_result: ApplyResult) -> None:
    pass


def _state(path: Path) -> ReplicatedState:
    store = Store(str(path / "store"))
    store.open()
    sm = StateMachine(store, lease_ms=30_000, heartbeat_timeout_ms=10_000, retry=RetryPolicy())
    sm.recover()
    return ReplicatedState(sm, store, _ignore)


def _filled(path: Path) -> ReplicatedState:
    """Eight MB of payloads in the store."""
    state = _state(path)
    rng = random.Random(7)  # incompressible: RocksDB compresses its files
    specs = [TaskSpec(f"t{i:04d}", "echo", rng.randbytes(64_000)) for i in range(128)]
    for k in range(0, 128, 16):
        state.sm.apply(1_000 + k, [Submit(specs[k : k + 16])], applied_index=1 + k // 16)
    return state


def test_a_snapshot_is_streamed_into_its_file_and_back(tmp_path: Path) -> None:
    source = _filled(tmp_path / "a")
    expected = dump_store(source.store)
    snap = tmp_path / "snap"
    pack = source.snapshot_begin()
    tracemalloc.start()
    try:
        with snap.open("wb") as f:
            pack(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert snap.stat().st_size > 7 * MB  # the payloads: 128 x 64,000 bytes
    assert peak < 2 * MB, f"packing held {peak / MB:.1f} MB in memory"
    assert not list((tmp_path / "a").glob("tq-snap-*"))  # its checkpoint is gone

    target = _state(tmp_path / "b")
    tracemalloc.start()
    try:
        with snap.open("rb") as f:
            target.restore_from(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MB, f"restoring held {peak / MB:.1f} MB in memory"
    assert dump_store(target.store) == expected
    assert target.applied_index() == source.applied_index() == 8
    assert target.sm.counts["pending"] == 128
    source.store.close()
    target.store.close()


def test_a_checkpoint_left_by_a_killed_snapshot_is_removed_by_the_next(tmp_path: Path) -> None:
    source = _filled(tmp_path / "a")
    stale = tmp_path / "a" / "tq-snap-left-behind"
    stale.mkdir()
    (stale / "000042.sst").write_bytes(b"x")
    pack = source.snapshot_begin()
    assert not stale.exists()
    with (tmp_path / "snap").open("wb") as f:
        pack(f)
    source.store.close()


def _write_v3(path: Path, source: ReplicatedState) -> Path:
    """A format-3 snapshot file as RaftLog writes one: header, state, trailer."""
    with path.open("wb") as f:
        pickle.dump({"v": 3, "index": 8, "raft": RAFT_DATA}, f, protocol=4)
        sealing = cluster_module._Sealing(f)
        source.snapshot_begin()(sealing)  # type: ignore[arg-type]
        f.write(
            cluster_module._SNAP_TRAILER.pack(
                cluster_module._SNAP_MAGIC, sealing.length, sealing.crc
            )
        )
    return path


def _deserialize(raft_dir: Path, state: ReplicatedState, snapshot: Path) -> object:
    raft = RaftLog("127.0.0.1:7001", [], str(raft_dir), state, password=None)

    async def go() -> object:
        raft._loop = asyncio.get_running_loop()
        return await asyncio.to_thread(raft._deserialize_in_raft_thread, str(snapshot))

    out = asyncio.run(go())
    assert raft.snapshots_restored == 1
    return out


def test_a_snapshot_file_cut_short_is_refused_and_the_store_left_alone(tmp_path: Path) -> None:
    """pysyncobj writes a received snapshot without fsync: after a crash it can be short. Cut
    at a tar member boundary it read as a shorter, valid tar, and the node installed an empty
    store without a word (or deleted its own before failing to open the new one)."""
    source = _filled(tmp_path / "a")
    whole = _write_v3(tmp_path / "whole.snapshot", source).read_bytes()
    source.store.close()
    with (tmp_path / "whole.snapshot").open("rb") as f:
        pickle.load(f)
        start = f.tell()  # where the tar starts
    target = _state(tmp_path / "b")
    target.sm.apply(1, [Submit([TaskSpec("mine", "echo", b"1")])], applied_index=1)
    before = dump_store(target.store)
    trailer = cluster_module._SNAP_TRAILER.size
    for cut in (start + 512, start + 1024, len(whole) - trailer, len(whole) - 1):
        torn = tmp_path / f"torn-{cut}.snapshot"
        torn.write_bytes(whole[:cut])
        raft = RaftLog("127.0.0.1:7001", [], str(tmp_path / f"raft-{cut}"), target, password=None)
        with pytest.raises(SnapshotCorrupt):
            raft._deserialize_in_raft_thread(str(torn))
        assert dump_store(target.store) == before, cut
    damaged = bytearray(whole)
    damaged[start + 5000] ^= 0xFF
    (tmp_path / "damaged.snapshot").write_bytes(bytes(damaged))
    raft = RaftLog("127.0.0.1:7001", [], str(tmp_path / "raft-d"), target, password=None)
    with pytest.raises(SnapshotCorrupt, match="CRC"):
        raft._deserialize_in_raft_thread(str(tmp_path / "damaged.snapshot"))
    assert dump_store(target.store) == before
    target.store.close()


def test_snapshot_files_of_both_formats_restore(tmp_path: Path) -> None:
    source = _filled(tmp_path / "a")
    expected = dump_store(source.store)
    blob = source.snapshot()
    v1 = tmp_path / "v1.snapshot"
    with v1.open("wb") as f:
        pickle.dump({"v": 1, "index": 8, "raft": RAFT_DATA, "sm": blob}, f, protocol=4)
    v2 = tmp_path / "v2.snapshot"  # as 4ee36a5 wrote them: the tar, no trailer
    with v2.open("wb") as f:
        pickle.dump({"v": 2, "index": 8, "raft": RAFT_DATA}, f, protocol=4)
        source.snapshot_begin()(f)
    v3 = _write_v3(tmp_path / "v3.snapshot", source)
    source.store.close()
    for name, snapshot in (("v1", v1), ("v2", v2), ("v3", v3)):
        target = _state(tmp_path / name)
        assert _deserialize(tmp_path / f"raft-{name}", target, snapshot) == RAFT_DATA
        assert dump_store(target.store) == expected, name
        target.store.close()
