"""The single-node log over a real store and journal: what the store loses, the journal gives back
exactly, whatever the commands were; a full journal checkpoints instead of refusing; a journal
that does not continue the store refuses to start; a failed write is fatal and answered."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tq.store.journal as journal_module
from tq.broker.commands import (
    Cancel,
    Claim,
    Command,
    Extend,
    RegisterWorker,
    Report,
    Submit,
    Tick,
    WorkerLost,
)
from tq.broker.log import INLINE_BYTES, JOURNAL_OPS, LocalLog
from tq.broker.state import ApplyResult, StateMachine
from tq.model import ErrorInfo, RetryPolicy
from tq.protocol.messages import LeasedTask, LeaseRef, Outcome, TaskSpec
from tq.store import CF, Store, StoreError
from tq.store.journal import BLOCK, Journal, JournalError

from tests.broker.support import dump_store

LEASE_MS = 1_000


class Node:
    """Store, state machine and log opened the way ``BrokerCore.start`` opens them."""

    def __init__(
        self,
        data: Path,
        journal_bytes: int = 1024 * 1024,
        lease_ms: int = LEASE_MS,
        spin_us: int = 0,
    ) -> None:
        self.fatal: list[BaseException] = []
        self.store = Store(str(data / "store"))
        self.store.open()
        self.sm = StateMachine(
            self.store,
            lease_ms=lease_ms,
            heartbeat_timeout_ms=3_000,
            retry=RetryPolicy(base_s=0.5, max_s=1.0),
        )
        self.log = LocalLog(
            self.store,
            self.sm,
            self.fatal.append,
            _ignore,
            str(data / "journal"),
            journal_bytes,
            spin_us=spin_us,
        )
        self.replayed = self.log.recover()  # opens the state machine too

    def close(self) -> None:
        self.log.close()
        self.store.close()


def _ignore(_result: ApplyResult) -> None:
    pass


def after_power_cut(tmp_path: Path, cut: Path, journal: Path | None = None) -> Path:
    """A data dir as a power cut leaves it: RocksDB back at ``cut`` (a checkpoint taken mid-run,
    a consistent older point), the journal as it was written (if given)."""
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(cut, b / "store")
    if journal is not None:
        shutil.copy(journal, b / "journal")
    return b


async def commit(log: LocalLog, now_ms: int, cmds: list[Command]) -> list[Any]:
    fut: asyncio.Future[ApplyResult | BaseException] = asyncio.get_running_loop().create_future()
    log.append(now_ms, cmds, fut.set_result)
    log.kick()
    out = await fut
    assert isinstance(out, ApplyResult)
    return out.results


def specs(start: int, n: int, size: int = 50, max_retries: int = 3) -> list[TaskSpec]:
    return [
        TaskSpec(f"t{i:06d}", "echo", b"p" * size, max_retries=max_retries, backoff_s=0.5)
        for i in range(start, start + n)
    ]


def leased(results: list[Any]) -> list[LeasedTask]:
    out = results[-1]
    assert isinstance(out, list)
    return out


async def workload(node: Node, cut: Path) -> None:
    """Every kind of command, with the store copied (a consistent older point) half way: the
    journal's effects must bring that copy to exactly the bytes of the store that went on."""
    log = node.log
    log.start(asyncio.get_running_loop())
    t = 1_000_000
    await commit(log, t, [RegisterWorker("w1"), RegisterWorker("w2"), Submit(specs(0, 20))])
    first = leased(await commit(log, t + 10, [Claim("w1", ["default"], 5)]))
    second = leased(await commit(log, t + 20, [Claim("w2", ["default"], 5)]))
    await commit(log, t + 30, [Extend("w1", [LeaseRef(x.task.id, x.token) for x in first])])
    node.store.checkpoint(str(cut))  # RocksDB after a power cut: this far and no further
    # w2 finishes two, fails one (it will be retried), and leaves: its other two go back
    failure = ErrorInfo("ValueError", "boom", "")
    await commit(
        log,
        t + 40,
        [
            Report(
                "w2",
                [
                    Outcome(second[0].task.id, second[0].token, True, b'"done"'),
                    Outcome(second[1].task.id, second[1].token, True, b'"done"'),
                    Outcome(second[2].task.id, second[2].token, False, None, failure),
                ],
            ),
            WorkerLost("w2"),
        ],
    )
    # w1 heartbeats, finishes what it holds; a tick after the retry is due but inside w1's
    # extended leases (expiring those would reject the report that follows)
    await commit(log, t + 600, [Extend("w1", [LeaseRef(x.task.id, x.token) for x in first])])
    await commit(log, t + 1_100, [Tick()])
    done = [Outcome(x.task.id, x.token, True, b"1") for x in first]
    accepted = await commit(log, t + 1_200, [Report("w1", done)])
    assert accepted == [([x.task.id for x in first], [])]  # the extended leases still held
    await commit(log, t + 1_300, [Cancel("t000019"), Submit(specs(100, 5, size=3000))])
    more = leased(await commit(log, t + 1_400, [Claim("w1", ["default"], 20)]))
    assert len(more) > 5
    # many batches in one write, some small enough to be written on the loop, some not
    futs = []
    for k in range(10):
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.append(t + 2_000 + k, [Submit(specs(200 + 10 * k, 10, size=900))], fut.set_result)
        futs.append(fut)
    log.kick()
    await asyncio.gather(*futs)
    assert log.inline_flushes > 0
    assert log.flushes > log.inline_flushes


def test_replay_gives_back_exactly_what_the_store_lost(tmp_path: Path) -> None:
    """A power cut: RocksDB comes back at an older consistent point (a copy taken mid-run) while
    the journal holds every acknowledged batch. Recovery must give a byte-identical store."""
    a = tmp_path / "a"
    node = Node(a)
    cut = tmp_path / "cut"
    asyncio.run(workload(node, cut))
    expected = dump_store(node.store)
    states = dict(node.sm.counts)
    assert states["completed"] > 0
    assert states["running"] > 0
    assert states["cancelled"] == 1
    last = node.sm.applied_index
    node.close()

    b = after_power_cut(tmp_path, cut, a / "journal")
    again = Node(b)
    assert again.replayed == last - 4  # the copy held the first four batches
    assert again.sm.applied_index == last
    assert again.sm.counts == states
    assert dump_store(again.store) == expected
    again.close()

    # Recovery made the store durable and started the journal afresh: a second start replays
    # nothing and changes nothing.
    third = Node(b)
    assert third.replayed == 0
    assert dump_store(third.store) == expected
    third.close()


def test_a_big_batch_is_made_durable_by_a_store_sync_and_the_journal_follows_it(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    synced: list[int] = []
    flush = node.store.flush_wal

    def spy_flush() -> None:
        flush()
        synced.append(node.sm.applied_index)

    node.store.flush_wal = spy_flush  # type: ignore[method-assign]

    async def run() -> None:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [Submit(specs(0, 3))])  # small: journalled
        await commit(log, 2, [Submit(specs(10, JOURNAL_OPS + 1))])  # big: the store is synced
        await commit(log, 3, [Submit(specs(100, 2))])  # small again, after the sync

    asyncio.run(run())
    assert synced == [2]
    assert node.log.counters()["journal_store_syncs"] == 1
    journal = node.log._journal
    assert journal.first_index == 3  # restarted after the synced batch: records continue it
    node.close()
    j = Journal(str(tmp_path / "journal"), 1024 * 1024)
    assert [index for index, _ in j.open()] == [3]
    j.close()


def test_a_few_tasks_with_big_payloads_sync_the_store_instead(tmp_path: Path) -> None:
    """Twenty 4 KB payloads: few tasks, but a record over JOURNAL_MAX_BYTES, so the commit syncs
    the store rather than writing the payloads twice."""
    node = Node(tmp_path)

    async def run() -> tuple[int, int]:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [Submit(specs(0, 3))])
        before = log.counters()["journal_store_syncs"]
        await commit(log, 2, [Submit(specs(10, 20, size=4000))])
        return before, log.counters()["journal_store_syncs"]

    before, after = asyncio.run(run())
    assert JOURNAL_OPS >= 20
    assert after == before + 1
    node.close()


def test_a_command_with_big_effects_is_journalled_and_applied_again(tmp_path: Path) -> None:
    """``WorkerLost`` is one small command that requeues 300 leases: the journal holds the
    command, and a store that lost it gets the same 300 records back from applying it again."""
    a = tmp_path / "a"
    node = Node(a)
    cut = tmp_path / "cut"

    async def run() -> None:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [RegisterWorker("w1"), Submit(specs(0, 300, size=400))])
        for k in range(10):
            await commit(log, 2 + k, [Claim("w1", ["default"], 30)])
        node.store.checkpoint(str(cut))
        syncs = log.counters()["journal_store_syncs"]
        await commit(log, 20, [WorkerLost("w1")])
        assert log.counters()["journal_store_syncs"] == syncs  # journalled, not synced

    asyncio.run(run())
    assert node.sm.counts["pending"] == 300
    expected = dump_store(node.store)
    node.close()
    b = after_power_cut(tmp_path, cut, a / "journal")
    again = Node(b)
    assert again.replayed == 1
    assert again.sm.counts["pending"] == 300
    assert dump_store(again.store) == expected
    again.close()


def test_full_journal_checkpoints_and_loses_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path, journal_bytes=16 * BLOCK)  # 60 KiB of records
    store, sm, log = node.store, node.sm, node.log
    # The order that makes a checkpoint safe: the store's WAL is synced with every batch the
    # journal drops already in it, and only then does the journal start over.
    events: list[tuple[str, int]] = []
    flush, reset = store.flush_wal, log._journal.reset

    def spy_flush() -> None:
        flush()
        events.append(("store synced through", sm.applied_index))

    def spy_reset(first_index: int, lazy: bool = False) -> None:
        events.append(("journal restarts at", first_index))
        reset(first_index, lazy)

    store.flush_wal = spy_flush  # type: ignore[method-assign]
    log._journal.reset = spy_reset  # type: ignore[method-assign]

    async def run() -> None:
        log.start(asyncio.get_running_loop())
        # batches appended while checkpoints run, in waves of 3 per write
        for wave in range(20):
            futs = []
            for k in range(3):
                i = wave * 3 + k
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                log.append(5_000 + i, [Submit(specs(i * 5, 5, size=2000))], fut.set_result)
                futs.append(fut)
            log.kick()
            await asyncio.gather(*futs)

    asyncio.run(run())
    assert log.checkpoints >= 3
    assert len(events) == 2 * log.checkpoints
    for (what, synced), (then, first) in zip(events[::2], events[1::2], strict=True):
        assert (what, then) == ("store synced through", "journal restarts at")
        assert synced >= first - 1
    expected = dump_store(store)
    node.close()
    reopened = Node(tmp_path, journal_bytes=16 * BLOCK)
    assert reopened.sm.counts["pending"] == 300
    assert reopened.sm.applied_index == 60
    assert dump_store(reopened.store) == expected
    reopened.close()


async def test_a_commits_replies_are_handed_over_before_the_next_write(tmp_path: Path) -> None:
    """``on_delivered`` runs once a commit's callbacks have run and before the next commit's
    write starts: the broker sends those replies then, not a loop iteration later."""
    node = Node(tmp_path)
    try:
        log = node.log
        loop = asyncio.get_running_loop()
        log.start(loop)
        events: list[str] = []
        log.on_delivered = lambda: events.append("delivered")
        real_write = node.log._journal.write

        def write(data: bytes) -> None:
            events.append("write big" if len(data) > INLINE_BYTES else "write small")
            real_write(data)

        node.log._journal.write = write  # type: ignore[method-assign]
        second: asyncio.Future[Any] = loop.create_future()
        # a commit too big to write on the loop goes to the writer thread; the next batch,
        # appended meanwhile, waits for it and gets a write of its own
        log.append(1, [Submit(specs(0, 3, size=2000))], lambda _: events.append("done 1"))
        log.kick()
        log.append(
            2, [Submit(specs(3, 1))], lambda r: (events.append("done 2"), second.set_result(r))
        )
        log.kick()
        await second
        assert events == [
            "write big", "done 1", "delivered", "write small", "done 2", "delivered"
        ]  # fmt: skip
    finally:
        node.close()


async def test_a_failing_reply_hand_off_does_not_stop_the_next_commit(tmp_path: Path) -> None:
    """Socket code runs inside the commit path now (``on_delivered``): if it raised, the next
    commit must still be written and its waiters answered."""
    node = Node(tmp_path)
    try:
        log = node.log
        log.start(asyncio.get_running_loop())

        def broken() -> None:
            raise RuntimeError("a transport went away")

        log.on_delivered = broken
        first = await commit(log, 1, [Submit(specs(0, 3, size=2000))])  # writer thread
        second = await commit(log, 2, [Submit(specs(3, 1))])  # written on the loop
        assert first[0][0] == ["t000000", "t000001", "t000002"]
        assert second[0][0] == ["t000003"]
        assert not log.failed
        assert not node.fatal
    finally:
        node.close()


def test_a_journal_that_skips_batches_refuses_to_start(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "journal"), 16 * BLOCK)
    list(j.open())
    j.reset(5)
    j.next_index = 5
    j.append(5, b"\x90")  # batch 5 (no effects), while the store has applied nothing
    j.write(j.take())
    j.close()
    with pytest.raises(JournalError, match="batches in between are missing"):
        Node(tmp_path)


def test_an_empty_journal_ahead_of_the_store_refuses_to_start(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "journal"), 16 * BLOCK)
    list(j.open())
    j.reset(50)  # the journal says everything before 50 is in the store; the store is empty
    j.close()
    with pytest.raises(JournalError, match="from 50 on, but the store only up to 0"):
        Node(tmp_path)


def test_a_failed_write_is_fatal_and_every_waiter_hears_it(tmp_path: Path) -> None:
    node = Node(tmp_path)
    log = node.log

    async def run() -> list[Any]:
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [Submit(specs(0, 1))])
        os.close(log._journal._fd)  # the disk goes away: the next write fails (EBADF)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.append(2, [Submit(specs(1, 1))], fut.set_result)
        log.kick()
        first = await fut
        later: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.when_durable(later.set_result)
        return [first, await later]

    first, later = asyncio.run(run())
    assert isinstance(first, OSError)
    assert later is first
    assert node.fatal == [first]
    log._journal._fd = -1
    node.close()


@pytest.mark.parametrize("where", ["write", "read"])
def test_a_store_that_refuses_a_write_or_a_read_is_fatal_and_answered(
    tmp_path: Path, where: str
) -> None:
    """Disk full (ENOSPC) or an I/O error inside RocksDB: the exception escaped into the event
    loop, the tick's clients never got a reply, and the broker stayed up, stuck and 'ready'."""
    node = Node(tmp_path)
    log = node.log
    db, cfs = node.store._db, node.store._cfs

    class Refusing:
        """The store's RocksDB, failing as rocksdict does when the disk fails."""

        def __getattr__(self, name: str) -> Any:
            return getattr(db, name)

        def write(self, *args: Any) -> None:
            raise Exception("IO error: No space left on device: While appending to file")

    async def run() -> list[Any]:
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [RegisterWorker("w1"), Submit(specs(0, 3))])
        if where == "write":
            node.store._db = Refusing()  # type: ignore[assignment]
            cmds: list[Command] = [Submit(specs(3, 1))]
        else:

            class Unreadable(dict[Any, Any]):
                def __getitem__(self, cf: Any) -> Any:
                    class Col:
                        def get(self, key: bytes) -> bytes:
                            raise Exception("IO error: Input/output error")

                    return Col()

            node.store._cfs = Unreadable(cfs)
            cmds = [Cancel("t000001")]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.append(2, cmds, fut.set_result)
        log.kick()
        first = await fut
        later: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.append(3, [Submit(specs(4, 1))], later.set_result)
        return [first, await later]

    first, later = asyncio.run(run())
    assert isinstance(first, StoreError), first
    assert later is first
    assert node.fatal == [first]
    node.store._db, node.store._cfs = db, cfs
    node.close()


async def test_a_small_commit_starts_its_write_before_the_batch_is_applied(tmp_path: Path) -> None:
    """The disk works while the state machine does: on an idle log a small batch's write is
    started before ``apply`` and waited for after it (at the end of the tick), polling for its
    end first for the log's ``spin_us`` (tq broker --spin-us)."""
    node = Node(tmp_path, spin_us=180)
    try:
        log = node.log
        log.start(asyncio.get_running_loop())
        events: list[str] = []
        journal, sm = log._journal, node.sm
        real_start, real_finish, real_apply = journal.start_write, journal.finish_write, sm.apply

        def start_write(data: bytes, overlap: bool = False) -> None:
            events.append(f"start overlap={overlap}")
            real_start(data, overlap)

        def finish_write(spin_ns: int = 0) -> None:
            events.append(f"finish spin_ns={spin_ns}")
            real_finish(spin_ns)

        def apply(*args: Any, **kwargs: Any) -> ApplyResult:
            events.append("apply")
            return real_apply(*args, **kwargs)

        journal.start_write = start_write  # type: ignore[method-assign]
        journal.finish_write = finish_write  # type: ignore[method-assign]
        sm.apply = apply  # type: ignore[method-assign]
        result = await commit(log, 1, [Submit(specs(0, 1))])
        assert result[0][0] == ["t000000"]
        assert events == ["start overlap=True", "apply", "finish spin_ns=180000"]
    finally:
        node.close()


def test_a_format_2_journal_of_effects_is_still_written_back(tmp_path: Path) -> None:
    """A broker upgraded after a crash finds a journal from before format 3, whose records hold
    each batch's effects (every put and delete): they are written back as they were."""
    a = tmp_path / "a"
    node = Node(a)
    cut = tmp_path / "cut"
    effects: list[bytes] = []

    async def run() -> None:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [RegisterWorker("w1"), Submit(specs(0, 10))])
        node.store.checkpoint(str(cut))
        before = dump_store(node.store)
        for k, cmds in enumerate(
            [[Submit(specs(10, 5))], [Claim("w1", ["default"], 4)], [Cancel("t000009")]]
        ):
            await commit(log, 2 + k, cmds)
            after = dump_store(node.store)
            ops: list[tuple[int, bytes, bytes | None]] = []
            for code, cf in enumerate(CF):
                old, new = dict(before[cf.value]), dict(after[cf.value])
                ops += [(code, key, value) for key, value in new.items() if old.get(key) != value]
                ops += [(code, key, None) for key in old if key not in new]
            effects.append(msgspec.msgpack.encode(ops))
            before = after

    asyncio.run(run())
    expected = dump_store(node.store)
    node.close()
    b = after_power_cut(tmp_path, cut)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(journal_module, "_VERSION", 2)
        old = Journal(str(b / "journal"), 1024 * 1024)
        list(old.open())
        old.reset(2)
        old.next_index = 2
        for i, payload in enumerate(effects):
            old.append(2 + i, payload)
        old.write(old.take())
        old.close()
    again = Node(b)
    assert again.replayed == 3
    assert dump_store(again.store) == expected
    assert again.log._journal.format == 2  # as opened; the reset after recovery wrote format 3
    again.close()
    reopened = Journal(str(b / "journal"), 1024 * 1024)
    assert list(reopened.open()) == []
    assert reopened.format == 3
    reopened.close()


def test_batches_are_applied_again_with_the_settings_they_were_first_applied_with(
    tmp_path: Path,
) -> None:
    """A power cut, then a restart with another ``--lease``: the journal's claim must get the
    deadline it first got, or the tick after it expires the lease and the worker's accepted
    report is rejected on replay (an acknowledged result lost)."""
    a = tmp_path / "a"
    node = Node(a, lease_ms=30_000)
    cut = tmp_path / "cut"

    async def run() -> None:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1_000, [RegisterWorker("w1"), Submit(specs(0, 1))])
        node.store.checkpoint(str(cut))
        lease = leased(await commit(log, 2_000, [Claim("w1", ["default"], 1)]))[0]
        await commit(log, 5_000, [Extend("w1", [])])  # the worker is alive (heartbeat 3 s)
        await commit(log, 5_500, [Tick()])  # 3.5 s after the claim: inside 30 s, not 3 s
        report = [Outcome(lease.task.id, lease.token, True, b"1")]
        assert await commit(log, 6_000, [Report("w1", report)]) == [([lease.task.id], [])]

    asyncio.run(run())
    expected = dump_store(node.store)
    node.close()
    b = after_power_cut(tmp_path, cut, a / "journal")
    again = Node(b, lease_ms=3_000)
    assert again.replayed == 4
    assert again.sm.counts["completed"] == 1
    assert dump_store(again.store) == expected
    assert again.sm.lease_ms == 3_000  # this run's own flags once the journal is applied
    again.close()


def test_a_batch_that_failed_to_apply_is_not_applied_at_the_next_start(tmp_path: Path) -> None:
    """An idle broker's write starts before the apply: when the apply then fails (disk full),
    the batch is on disk though its clients were told it failed. A VOID record after it keeps
    the restart from applying it."""
    node = Node(tmp_path)
    db = node.store._db

    class Refusing:
        def __getattr__(self, name: str) -> Any:
            return getattr(db, name)

        def write(self, *args: Any) -> None:
            raise Exception("IO error: No space left on device: While appending to file")

    async def run() -> Any:
        log = node.log
        log.start(asyncio.get_running_loop())
        await commit(log, 1, [Submit(specs(0, 2))])
        node.store._db = Refusing()  # type: ignore[assignment]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        log.append(2, [Submit(specs(2, 1)), Cancel("t000000")], fut.set_result)
        log.kick()
        return await fut

    answer = asyncio.run(run())
    assert isinstance(answer, StoreError)
    assert log_inline(node) == 2  # both commits' writes were started before their apply
    node.store._db = db
    node.close()
    again = Node(tmp_path)
    assert again.sm.get_task("t000002") is None
    assert again.sm.get_task("t000000").state == "pending"  # not cancelled
    assert again.sm.counts["pending"] == 2
    assert again.sm.applied_index == 3  # the failed batch and its VOID record, as empty batches
    again.close()
    third = Node(tmp_path)  # and nothing is left to apply again
    assert third.replayed == 0
    third.close()


def log_inline(node: Node) -> int:
    return node.log.counters()["journal_inline_writes"]


def test_the_batches_before_one_that_failed_to_apply_are_answered_as_they_will_stand(
    tmp_path: Path,
) -> None:
    """A submit (M) serves a parked claim, whose batch (N) is appended from M's ``on_applied``,
    before M's callback is registered; N's apply fails. M is durable (its write started before
    its apply) and comes back at the next start: its client must hear it succeeded, not N's
    error. (It heard the error, then found the task after the restart.)"""
    node = Node(tmp_path)
    log, sm = node.log, node.sm
    real_apply = sm.apply
    answers: dict[str, Any] = {}

    def apply(now_ms: int, commands: Any, applied_index: int | None = None) -> ApplyResult:
        if any(isinstance(c, Claim) for c in commands):
            raise StoreError("store write failed: IO error: No space left on device")
        return real_apply(now_ms, commands, applied_index=applied_index)

    def serve_parked_claim(result: ApplyResult) -> None:
        if "n" not in answers:
            answers["n"] = None
            log.append(3, [Claim("w1", ["default"], 1)], lambda r: answers.update(n=r))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        log.start(loop)
        await commit(log, 1, [RegisterWorker("w1")])
        sm.apply = apply  # type: ignore[method-assign]
        log._on_applied = serve_parked_claim
        done: asyncio.Future[Any] = loop.create_future()
        log.append(2, [Submit(specs(0, 1))], done.set_result)
        log.kick()
        answers["m"] = await done

    asyncio.run(run())
    assert isinstance(answers["m"], ApplyResult), answers["m"]
    assert isinstance(answers["n"], StoreError)
    assert node.fatal
    # reads wait on when_durable: memory may hold part of N, so none runs any more
    later: list[Any] = []
    log.when_durable(later.append)
    assert isinstance(later[0], StoreError)
    sm.apply = real_apply  # type: ignore[method-assign]
    node.close()
    again = Node(tmp_path)
    assert again.sm.get_task("t000000") is not None  # M, as its client was told
    assert again.sm.counts["running"] == 0  # N's claim, as its client was told
    again.close()
