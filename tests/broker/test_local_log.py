"""The single-node log over a real store and journal: what the store loses, the journal's replay
gives back exactly; a full journal checkpoints instead of refusing; a journal that does not
continue the store refuses to start."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from tq.broker.commands import Command, Submit
from tq.broker.log import LocalLog
from tq.broker.state import ApplyResult, StateMachine
from tq.model import RetryPolicy
from tq.protocol.messages import TaskSpec
from tq.store import CF, Store
from tq.store.journal import BLOCK, Journal, JournalError


def machine(store: Store) -> StateMachine:
    return StateMachine(
        store, lease_ms=30_000, heartbeat_timeout_ms=10_000, retry=RetryPolicy(1.0, 300.0)
    )


def open_log(data: Path, journal_bytes: int = 1024 * 1024) -> tuple[Store, StateMachine, LocalLog]:
    store = Store(str(data / "store"))
    store.open()
    sm = machine(store)
    sm.recover()
    log = LocalLog(store, sm, _fatal, _ignore, str(data / "journal"), journal_bytes)
    log.recover()
    return store, sm, log


def _fatal(exc: BaseException) -> None:
    raise AssertionError(f"log failed: {exc}")


def _ignore(_result: ApplyResult) -> None:
    pass


def submits(start: int, n: int, size: int = 50) -> list[Command]:
    return [Submit([TaskSpec(f"t{i:06d}", "echo", b"p" * size) for i in range(start, start + n)])]


async def append_durably(log: LocalLog, now_ms: int, cmds: list[Command]) -> ApplyResult:
    fut: asyncio.Future[ApplyResult | BaseException] = asyncio.get_running_loop().create_future()
    log.append(now_ms, cmds, fut.set_result)
    log.kick()
    out = await fut
    assert isinstance(out, ApplyResult)
    return out


def contents(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    return {cf.value: list(store.items(cf)) for cf in CF}


def test_replay_rebuilds_what_the_store_lost(tmp_path: Path) -> None:
    """A power cut: RocksDB comes back at an older consistent point (here: a checkpoint taken
    mid-run), the journal holds every acknowledged batch. Recovery must give the same store."""
    a = tmp_path / "a"
    store, sm, log = open_log(a)
    older = tmp_path / "older-store"

    async def run() -> None:
        log.start(asyncio.get_running_loop())
        for k in range(20):
            await append_durably(log, 1_000 + k, submits(k * 10, 10))
            if k == 7:
                store.checkpoint(str(older))
        # several batches in one commit (some small enough to go inline, some not)
        futs = []
        for k in range(20, 40):
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            log.append(2_000 + k, submits(k * 10, 10, size=1000 if k % 3 else 10), fut.set_result)
            futs.append(fut)
        log.kick()
        await asyncio.gather(*futs)

    asyncio.run(run())
    assert log.inline_flushes > 0
    assert log.flushes > log.inline_flushes
    expected = contents(store)
    assert sm.applied_index == 40
    log.close()
    store.close()

    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(older, b / "store")
    shutil.copy(a / "journal", b / "journal")
    store2, sm2, log2 = open_log(b)
    assert log2.replayed == 40 - 8
    assert sm2.applied_index == 40
    assert sm2.counts["pending"] == 400
    assert contents(store2) == expected
    log2.close()
    store2.close()

    # Recovery made the store durable and started the journal afresh: a second start replays
    # nothing and changes nothing.
    store3, _sm3, log3 = open_log(b)
    assert log3.replayed == 0
    assert contents(store3) == expected
    log3.close()
    store3.close()


def test_full_journal_checkpoints_and_loses_nothing(tmp_path: Path) -> None:
    store, sm, log = open_log(tmp_path, journal_bytes=16 * BLOCK)  # 60 KiB of records
    # The order that makes a checkpoint safe: the store's WAL is synced with every batch the
    # journal drops already in it, and only then does the journal start over.
    events: list[tuple[str, int]] = []
    flush, reset = store.flush_wal, log._journal.reset

    def spy_flush() -> None:
        flush()
        events.append(("store synced through", sm.applied_index))

    def spy_reset(first_index: int) -> None:
        events.append(("journal restarts at", first_index))
        reset(first_index)

    store.flush_wal = spy_flush  # type: ignore[method-assign]
    log._journal.reset = spy_reset  # type: ignore[method-assign]

    async def run() -> None:
        log.start(asyncio.get_running_loop())
        for k in range(60):
            await append_durably(log, 5_000 + k, submits(k * 5, 5, size=2000))

    asyncio.run(run())
    assert log.checkpoints >= 3
    assert len(events) == 2 * log.checkpoints
    for (what, synced), (then, first) in zip(events[::2], events[1::2], strict=True):
        assert (what, then) == ("store synced through", "journal restarts at")
        assert synced >= first - 1
    log.close()
    store.close()
    store2, sm2, log2 = open_log(tmp_path, journal_bytes=16 * BLOCK)
    assert sm2.counts["pending"] == 300
    assert sm2.applied_index == 60
    assert sm2.get_task("t000299") is not None
    log2.close()
    store2.close()


def test_journal_that_skips_batches_refuses_to_start(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "journal"), 16 * BLOCK)
    list(j.open())
    j.reset(5)
    j.next_index = 5
    j.append(5, b"\x92\x01\x90")  # batch 5, while the store has applied nothing
    j.write(j.take())
    j.close()
    with pytest.raises(JournalError, match="resumes at batch 5"):
        open_log(tmp_path)
