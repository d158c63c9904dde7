"""Order-preserving keys.

Pending keys sort as (queue, priority, sequence): ``queue utf-8 | 0x00 | priority byte | seq (8
bytes, big-endian)``. Queue names cannot contain NUL, so the separator sorts the shorter name
first, exactly as string comparison does. Every other column family is keyed by task id; tq's ids
start with the submission time in hex, so that order is submission order.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Final

_SEQ: Final = struct.Struct(">BQ")
# Keys grouped per slice of a scan (pending_runs): bounds what a scan of millions holds at once.
RUN_SLICE: Final = 65_536


class CF(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    CANCELLED = "cancelled"
    IDS = "ids"  # task id -> its key in `pending` (dedup on submit, and status lookups)
    META = "meta"  # counters and sequence high-water marks


def pending_key(queue: str, priority: int, seq: int) -> bytes:
    return queue.encode() + b"\x00" + _SEQ.pack(priority, seq)


def pending_prefix(queue: str) -> bytes:
    return queue.encode() + b"\x00"


def split_pending_key(key: bytes) -> tuple[str, int, int]:
    sep = len(key) - 10
    priority, seq = _SEQ.unpack_from(key, sep + 1)
    return key[:sep].decode(), priority, seq


def pending_runs(keys: Iterable[bytes]) -> Iterator[tuple[str, int, array[int]]]:
    """Group sorted pending keys into runs of one queue and priority: ``(queue, priority, seqs)``
    in key order; one queue and priority may come as several runs in a row.

    Recovery reads every pending key. Splitting each with ``split_pending_key`` and appending
    its number cost ~1.5 µs a key in Python, 1.5 s of a restart with a million pending. A run's
    keys share one prefix and one length (queue names hold no NUL), so its end is found by
    bisection and its sequence numbers are cut out of the joined keys with eight strided byte
    copies, all in C."""
    it = iter(keys)
    while chunk := list(itertools.islice(it, RUN_SLICE)):
        i, n = 0, len(chunk)
        while i < n:
            key = chunk[i]
            size = len(key)
            head = key[: size - 8]  # queue, NUL, priority
            # Every key in [head, head + ff..ff] starts with head: this queue and priority.
            j = bisect.bisect_right(chunk, head + b"\xff" * 8, i)
            blob = b"".join(chunk[i:j])
            if len(blob) != size * (j - i):  # not keys tq wrote (a NUL in a queue name)
                for k in chunk[i:j]:
                    queue, priority, seq = split_pending_key(k)
                    yield queue, priority, array("Q", (seq,))
                i = j
                continue
            packed = bytearray(8 * (j - i))
            for b in range(8):
                packed[b::8] = blob[size - 8 + b :: size]
            seqs = array("Q")
            seqs.frombytes(packed)
            if sys.byteorder == "little":
                seqs.byteswap()  # the keys hold them big-endian, to sort
            yield head[:-2].decode(), head[-1], seqs
            i = j
