"""Order-preserving keys.

Pending keys sort as (queue, priority, sequence): ``queue utf-8 | 0x00 | priority byte | seq (8
bytes, big-endian)``. Queue names cannot contain NUL, so the separator sorts the shorter name
first, exactly as string comparison does. Every other column family is keyed by task id; tq's ids
start with the submission time in hex, so that order is submission order.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

_SEQ: Final = struct.Struct(">BQ")


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
