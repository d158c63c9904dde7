"""The commit journal on a real file: what was written comes back, a torn or stale tail never
does, a reset forgets exactly what came before it. Run in both write modes (O_DIRECT where the
filesystem has it, and the buffered fallback)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tq.store.aio import Aio
from tq.store.journal import BLOCK, Journal, JournalError, JournalFull

SEGMENT = 16 * BLOCK


@pytest.fixture(params=[None, False], ids=["direct", "buffered"])
def mode(request: pytest.FixtureRequest) -> bool | None:
    return request.param  # type: ignore[no-any-return]


def opened(
    path: Path, mode: bool | None, skip_through: int = 0
) -> tuple[Journal, list[tuple[int, bytes]]]:
    j = Journal(str(path), SEGMENT, direct=mode)
    records = list(j.open(skip_through))
    return j, records


def write_all(j: Journal, payloads: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for p in payloads:
        index = j.next_index
        j.append(index, p)
        out.append((index, p))
    j.write(j.take())
    return out


def test_records_come_back_in_order_after_reopen(tmp_path: Path, mode: bool | None) -> None:
    path = tmp_path / "j"
    j, records = opened(path, mode)
    assert records == []
    if mode is None:
        assert j.direct  # ext4 under tmp_path: O_DIRECT is used
    written = write_all(j, [b"a" * 10, b"", b"b" * 5000])
    written += write_all(j, [bytes([i]) * i for i in range(1, 40)])
    j.close()
    j2, records = opened(path, mode)
    assert records == written
    assert j2.next_index == written[-1][0] + 1
    # appending after a reopen continues the same run
    more = write_all(j2, [b"after reopen"])
    j2.close()
    assert opened(path, mode)[1] == written + more


def test_torn_tail_is_cut_at_the_last_intact_record(tmp_path: Path, mode: bool | None) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    written = write_all(j, [b"x" * 100 for _ in range(10)])
    j.close()
    # flip one byte inside the 8th record's payload: it and everything after it are gone
    raw = bytearray(path.read_bytes())
    pos = BLOCK + 7 * (16 + 100) + 16 + 50
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    j2, records = opened(path, mode)
    assert records == written[:7]
    # the next record takes index 8 and overwrites the damaged one
    again = write_all(j2, [b"replacement"])
    assert again == [(8, b"replacement")]
    j2.close()
    assert opened(path, mode)[1] == written[:7] + again


def test_reset_forgets_older_records_even_where_they_remain_on_disk(
    tmp_path: Path, mode: bool | None
) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    write_all(j, [b"old" * 50 for _ in range(30)])  # indexes 1..30
    j.reset(31)
    new = write_all(j, [b"new"])  # one short record where 30 longer ones were
    j.close()
    j2, records = opened(path, mode)
    assert records == new == [(31, b"new")]
    assert j2.first_index == 31
    assert j2.next_index == 32


def test_records_after_a_tear_never_come_back_after_a_reset_to_the_same_index(
    tmp_path: Path, mode: bool | None
) -> None:
    """A power cut tears a write of batches 1-3 so that batch 1 is lost but 2 and 3 reached the
    disk. Recovery resets to 1 again and the next life writes a new batch 1 that ends exactly
    where the old 2 begins: the old 2 and 3 carry the expected indexes, and only the reset's new
    generation keeps them out."""
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    first = b"1" * (BLOCK - 16)  # record 1 fills block 1 exactly
    write_all(j, [first, b"old 2", b"old 3"])
    j.close()
    raw = bytearray(path.read_bytes())
    raw[BLOCK : 2 * BLOCK] = bytes(BLOCK)  # the torn part: record 1's block never arrived
    path.write_bytes(bytes(raw))
    j2, records = opened(path, mode)
    assert records == []
    j2.reset(1)  # as recovery does: the store is at 0, the journal restarts at 1
    new = write_all(j2, [b"N" * (BLOCK - 16)])  # acknowledged; the old 2 and 3 follow it
    j2.close()
    assert opened(path, mode)[1] == new


def test_records_orphaned_by_a_lost_header_never_come_back(
    tmp_path: Path, mode: bool | None
) -> None:
    """A lazy reset's header and its first records go out in one write; a power cut keeps the
    records but not sector 0. Recovery (store synced through 2) restarts the journal at 3 again;
    the orphaned record 4 must not pass as part of the new run, even when the next life adds no
    record of its own (its batch 3 made durable by a store sync) and the following start skips
    the stale record 3 as already in the store."""
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    write_all(j, [b"1", b"2"])
    j.close()
    before = path.read_bytes()[:BLOCK]  # the header as it was before the torn write
    j, _ = opened(path, mode)
    j.reset(3, lazy=True)
    j.next_index = 3
    write_all(j, [b"orphan 3", b"orphan 4"])
    j.close()
    raw = bytearray(path.read_bytes())
    raw[:BLOCK] = before  # sector 0 lost, the records kept
    path.write_bytes(bytes(raw))
    j2, records = opened(path, mode, skip_through=2)
    assert records == []
    j2.reset(3)  # recovery: the store holds 1..2
    j2.close()
    # next life: batch 3 is durable through a store sync, no journal record; then a start with
    # the store at 3 steps over record 3 unchecked and must not yield the orphaned 4
    assert opened(path, mode, skip_through=3)[1] == []


def test_a_lazy_reset_takes_effect_with_the_next_write(tmp_path: Path, mode: bool | None) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    old = write_all(j, [b"a", b"b", b"c"])
    j.reset(10, lazy=True)  # the store was synced through 9: nothing is written yet
    j.close()
    j2, records = opened(path, mode)
    assert records == old  # still the old run, all of it before 10: what recovery expects
    j2.reset(10, lazy=True)
    j2.next_index = 10
    new = write_all(j2, [b"x" * 5000, b"y"])  # header and records in one write
    more = write_all(j2, [b"z"])
    j2.close()
    j3, records = opened(path, mode)
    assert records == new + more
    assert j3.first_index == 10


def test_records_appended_while_a_checkpoint_runs_follow_the_reset(
    tmp_path: Path, mode: bool | None
) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    write_all(j, [b"1", b"2"])
    j.append(3, b"3")
    taken = j.take()  # the writer thread holds batch 3 ...
    j.append(4, b"4")  # ... while the loop appends batch 4
    j.reset(4)  # checkpoint instead of writing batch 3
    assert taken
    j.write(j.take())
    j.close()
    assert opened(path, mode)[1] == [(4, b"4")]


def test_full_journal_refuses_without_writing(tmp_path: Path, mode: bool | None) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    room = SEGMENT - BLOCK
    j.append(1, b"y" * (room - 16))  # exactly fills it
    data = j.take()
    assert j.fits(len(data))
    j.write(data)
    j.append(2, b"z")
    data = j.take()
    assert not j.fits(len(data))
    with pytest.raises(JournalFull):
        j.write(data)
    j.close()
    assert [i for i, _ in opened(path, mode)[1]] == [1]


def test_skip_through_steps_over_what_the_store_holds(tmp_path: Path, mode: bool | None) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, mode)
    written = write_all(j, [str(i).encode() for i in range(1, 11)])
    j.close()
    j2, records = opened(path, mode, skip_through=6)
    assert records == written[6:]
    assert j2.next_index == 11


def test_out_of_sequence_append_is_refused(tmp_path: Path) -> None:
    j, _ = opened(tmp_path / "j", None)
    with pytest.raises(JournalError, match="out of sequence"):
        j.append(5, b"no")


def test_damaged_header_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, None)
    j.close()
    with path.open("r+b") as f:
        f.write(b"garbage!")
    # ... and says the way out (a clean stop left nothing in it the store lacks)
    with pytest.raises(JournalError, match=r"header is damaged\); .* move the journal aside"):
        opened(path, None)
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(JournalError, match=r"truncated journal \(5000 bytes\); .* aside"):
        opened(path, None)


def test_a_new_size_takes_effect_at_the_next_reset(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j, _ = opened(path, None)
    written = write_all(j, [b"keep me"])
    j.close()
    bigger = Journal(str(path), 2 * SEGMENT)
    assert list(bigger.open()) == written  # read with the old size first
    bigger.reset(2)
    assert os.path.getsize(path) == 2 * SEGMENT
    more = write_all(bigger, [b"x" * (SEGMENT)])  # would not have fitted before
    bigger.close()
    assert list(Journal(str(path), 2 * SEGMENT).open()) == more


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.lists(st.integers(0, 3000), min_size=1, max_size=6)),
            st.tuples(st.just("reset"), st.just([])),
        ),
        min_size=1,
        max_size=25,
    ),
    direct=st.sampled_from([None, False]),
)
def test_reopen_always_gives_what_was_written_since_the_last_reset(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, list[int]]], direct: bool | None
) -> None:
    path = tmp_path_factory.mktemp("journal") / "j"
    j = Journal(str(path), 64 * BLOCK, direct=direct)
    assert list(j.open()) == []
    model: list[tuple[int, bytes]] = []
    for op, sizes in ops:
        if op == "reset":
            j.reset(j.next_index)
            model = []
            continue
        payloads = [bytes([(j.next_index + k) % 256]) * n for k, n in enumerate(sizes)]
        need = sum(16 + n for n in sizes)
        if not j.fits(need):
            j.reset(j.next_index)
            model = []
        model += write_all(j, payloads)
    j.close()
    j2 = Journal(str(path), 64 * BLOCK, direct=direct)
    got = list(j2.open())
    assert got == model, (ops, direct, got)
    j2.close()


def test_an_overlapped_write_runs_while_the_caller_works_and_reads_back_the_same(
    tmp_path: Path,
) -> None:
    """``start_write(overlap=True)`` submits through Linux AIO and returns with the write in
    flight; ``finish_write`` waits, sleeping at once, or polling first (for 1 µs, which runs
    out, or for 5 s, which the write ends). Mixed with plain writes, every record comes back."""
    path = tmp_path / "j"
    j, _ = opened(path, None)
    written: list[tuple[int, bytes]] = []
    probe = Aio.create()
    has_aio = probe is not None
    if probe is not None:
        probe.close()
    for k in range(30):
        index = j.next_index
        payload = bytes([k]) * (k * 97 % 3000)
        j.append(index, payload)
        written.append((index, payload))
        if k % 3:
            j.start_write(j.take(), overlap=True)
            if has_aio:  # submitted, not yet waited for
                assert j._aio is not None
                assert j._aio.busy
            with pytest.raises(JournalError, match="already in flight"):
                j.start_write(b"")
            j.finish_write(spin_ns=(0, 1000, 5_000_000_000)[(k // 3) % 3])
            assert j._aio is None or not j._aio.busy
        else:
            j.write(j.take())
    j.close()
    assert opened(path, None)[1] == written


@contextlib.contextmanager
def _aio_target(path: Path, flags: int) -> Iterator[tuple[Aio, int, int]]:
    """An AIO context, a file opened with ``flags`` and the address of one block of memory."""
    aio = Aio.create()
    if aio is None:
        pytest.skip("no Linux AIO here")
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    buf = mmap.mmap(-1, BLOCK)
    ref = ctypes.c_char.from_buffer(buf)
    try:
        yield aio, fd, ctypes.addressof(ref)
    finally:
        del ref
        aio.close()
        os.close(fd)
        buf.close()


def test_a_wait_given_time_to_poll_polls_before_it_sleeps(tmp_path: Path) -> None:
    """``Aio.wait(spin_ns)`` asks for the completion with a zero timeout (polling) before it
    blocks; without ``spin_ns`` it only blocks. A poll that runs out backs off."""
    with _aio_target(tmp_path / "f", os.O_RDWR) as (aio, fd, address):
        polls: list[bool] = []  # True: a zero-timeout poll, False: a blocking wait
        real = aio._getevent
        slow = False  # a disk slower than the poll: every zero-timeout poll finds nothing

        def getevent(timeout: Any) -> int:
            polls.append(timeout is not None)
            return 0 if slow and timeout is not None else real(timeout)

        aio._getevent = getevent  # type: ignore[method-assign]
        aio.submit(fd, address, BLOCK, 0)
        assert aio.wait(5_000_000_000) == BLOCK  # 5 s: the write ends first
        assert polls
        assert all(polls)
        assert aio.spins == 1
        polls.clear()
        aio.submit(fd, address, BLOCK, 0)
        assert aio.wait() == BLOCK
        assert polls == [False]
        polls.clear()
        aio.submit(fd, address, BLOCK, 0)
        slow = True
        assert aio.wait(1_000_000) == BLOCK  # the poll runs out after 1 ms, then it blocks
        slow = False
        assert polls[0]
        assert not polls[-1]
        polls.clear()
        aio.submit(fd, address, BLOCK, 0)
        assert aio.wait(5_000_000_000) == BLOCK  # backing off after that miss: blocks at once
        assert polls == [False]
        assert not aio.busy


def test_a_write_the_kernel_refuses_raises(tmp_path: Path) -> None:
    with _aio_target(tmp_path / "f", os.O_RDONLY) as (aio, fd, address):  # read-only: EBADF
        with pytest.raises(OSError, match="io_submit"):
            aio.submit(fd, address, BLOCK, 0)
        assert not aio.busy


def test_a_journal_holding_max_records_counts_as_full(tmp_path: Path) -> None:
    """The record bound keeps what recovery replays small, whatever the bytes."""
    j = Journal(str(tmp_path / "j"), SEGMENT, max_records=5)
    list(j.open())
    write_all(j, [b"x"] * 5)
    assert j.fits(10)
    j.append(j.next_index, b"x")
    assert not j.fits(10)
    with pytest.raises(JournalFull):
        j.write(j.take())
    j.reset(j.next_index)  # a checkpoint
    assert j.fits(10)
    j.close()
