"""Property tests for the order-preserving pending keys of the store."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tq.model import valid_name
from tq.store import keys as keys_module
from tq.store.keys import pending_key, pending_prefix, pending_runs, split_pending_key

QUEUE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"

queues = st.text(alphabet=QUEUE_ALPHABET, min_size=1, max_size=50)
priorities = st.integers(min_value=0, max_value=2)
seqs = st.integers(min_value=0, max_value=2**64 - 1)
entries = st.tuples(queues, priorities, seqs)


def test_queue_strategy_matches_the_queue_name_rule() -> None:
    assert all(valid_name(c) for c in QUEUE_ALPHABET)


@given(entry=entries)
@example(entry=("a", 0, 0))
@example(entry=("z" * 50, 2, 2**64 - 1))
def test_split_inverts_pending_key(entry: tuple[str, int, int]) -> None:
    key = pending_key(*entry)
    assert split_pending_key(key) == entry
    assert key.startswith(pending_prefix(entry[0]))


@given(a=entries, b=entries)
@example(a=("a", 2, 2**64 - 1), b=("ab", 0, 0))  # a shorter name sorts first, whatever follows
@example(a=("a", 0, 256), b=("a", 1, 0))  # priority outranks any sequence
@example(a=("a", 0, 255), b=("a", 0, 256))  # sequence compares numerically, not bytewise-LE
@example(a=("A", 0, 0), b=("a", 0, 0))
@example(a=("-", 0, 0), b=("0", 0, 0))
def test_pending_keys_compare_as_tuples(a: tuple[str, int, int], b: tuple[str, int, int]) -> None:
    ka, kb = pending_key(*a), pending_key(*b)
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)


@given(items=st.lists(entries, max_size=40))
def test_sorting_keys_sorts_tuples(items: list[tuple[str, int, int]]) -> None:
    by_key = sorted(items, key=lambda e: pending_key(*e))
    assert by_key == sorted(items)
    assert [split_pending_key(k) for k in sorted(pending_key(*e) for e in items)] == sorted(items)


@given(a=entries, other=queues)
@example(a=("ab", 0, 0), other="a")
@example(a=("a", 0, 0), other="ab")
def test_prefix_selects_exactly_one_queue(a: tuple[str, int, int], other: str) -> None:
    """A prefix scan of one queue never strays into a queue whose name extends it."""
    assert pending_key(*a).startswith(pending_prefix(other)) == (a[0] == other)


@given(queue=queues, priority=priorities, seq=seqs, other=entries)
def test_prefix_bounds_the_queue(
    queue: str, priority: int, seq: int, other: tuple[str, int, int]
) -> None:
    """Every key of ``queue`` sorts at or after its prefix, and a key of another queue that
    sorts after the prefix sorts after every key of ``queue`` (so a seek + stop scan is exact)."""
    key = pending_key(queue, priority, seq)
    prefix = pending_prefix(queue)
    assert key >= prefix
    other_key = pending_key(*other)
    if other[0] != queue and other_key >= prefix:
        assert other_key > key


def _flatten(keys: list[bytes]) -> list[tuple[str, int, int]]:
    return [(q, p, seq) for q, p, seqs in pending_runs(keys) for seq in seqs]


@given(items=st.lists(entries, max_size=60, unique=True))
@example(items=[("a", 0, 1), ("a", 0, 2**64 - 1), ("ab", 0, 0), ("a", 1, 0), ("b", 2, 255)])
def test_pending_runs_splits_like_split_pending_key(items: list[tuple[str, int, int]]) -> None:
    """Recovery's bulk reading of the pending keys (``pending_runs``) gives every key's queue,
    priority and sequence number, in key order, exactly as splitting them one by one."""
    keys = sorted(pending_key(*e) for e in items)
    assert _flatten(keys) == [split_pending_key(k) for k in keys]


def test_pending_runs_group_one_queue_and_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run never mixes queues or priorities, and a run cut by the end of a slice of the scan
    goes on in the next run, in order."""
    monkeypatch.setattr(keys_module, "RUN_SLICE", 4)
    items = [("q", 0, s) for s in range(10)] + [("q", 1, 7), ("q2", 0, 3), ("r", 2, 2**63 + 5)]
    keys = sorted(pending_key(*e) for e in items)
    runs = [(q, p, list(seqs)) for q, p, seqs in pending_runs(keys)]
    assert runs == [
        ("q", 0, [0, 1, 2, 3]),
        ("q", 0, [4, 5, 6, 7]),
        ("q", 0, [8, 9]),
        ("q", 1, [7]),
        ("q2", 0, [3]),
        ("r", 2, [2**63 + 5]),
    ]


def test_pending_runs_take_keys_of_another_shape_one_at_a_time() -> None:
    """Keys tq would not write (a NUL inside a queue name) break the one-length rule of a run:
    they are split one by one rather than misread."""
    keys = sorted([pending_key("a", 0, 5), pending_key("a\x00\x00x", 0, 6), pending_key("a", 0, 7)])
    assert _flatten(keys) == [split_pending_key(k) for k in keys]
