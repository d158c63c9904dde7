"""Pure values shared by every part of tq: tasks, states, priorities, ids. No I/O here."""

from __future__ import annotations

import enum
import itertools
import os
import re
import time
import zlib
from typing import Final

import msgspec

MAX_PAYLOAD_BYTES: Final = 10 * 1024 * 1024
DEFAULT_QUEUE: Final = "default"
DEFAULT_MAX_RETRIES: Final = 3
DEFAULT_TIMEOUT_S: Final = 300.0

_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


class TaskState(enum.StrEnum):
    """Where a task is in its life.

    ``failed`` means an attempt failed and a retry is scheduled (the task waits out its backoff);
    ``dead`` means retries are exhausted and the task sits in the dead-letter queue.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL: Final = frozenset({TaskState.COMPLETED, TaskState.DEAD, TaskState.CANCELLED})


class Priority(enum.IntEnum):
    """Lower value is served first: strict priority order, FIFO within one priority."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        hit = _PRIORITY_NAMES.get(value) if isinstance(value, str) else None
        if hit is not None:  # the common case, "normal" and friends: one lookup per submit
            return hit
        if isinstance(value, Priority):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        hit = _PRIORITY_NAMES.get(value.lower()) if isinstance(value, str) else None
        if hit is None:  # also whatever is neither a name nor an int: a float, a bool
            raise ValueError(f"priority must be high, normal or low, not {value!r}")
        return hit

    @property
    def label(self) -> str:
        return self.name.lower()


_PRIORITY_NAMES: Final = {p.name.lower(): p for p in Priority}


class ErrorInfo(msgspec.Struct, frozen=True, array_like=True):
    """A task failure as data: never a pickled exception."""

    type: str
    message: str
    traceback: str = ""


class Task(msgspec.Struct, frozen=True, array_like=True):
    """The durable record of one task, as stored and as shipped to workers."""

    id: str
    name: str
    queue: str
    priority: int
    state: str
    payload: bytes
    attempt: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_s: float = DEFAULT_TIMEOUT_S
    submitted_at_ms: int = 0
    started_at_ms: int = 0
    finished_at_ms: int = 0
    eta_ms: int = 0
    result: bytes | None = None
    error: ErrorInfo | None = None
    worker_id: str = ""
    seq: int = 0
    backoff_s: float = 0.0


class RetryPolicy(msgspec.Struct, frozen=True):
    """Exponential backoff with deterministic jitter, so a replayed history retries identically."""

    base_s: float = 1.0
    max_s: float = 300.0

    def delay_ms(self, task_id: str, attempt: int, base_s: float = 0.0) -> int:
        base = base_s if base_s > 0 else self.base_s
        raw = min(self.max_s, base * (2 ** max(0, attempt - 1)))
        # Jitter in [0.5, 1.0) from the id and attempt: spreads a herd of retries, replays exactly.
        frac = (zlib.crc32(f"{task_id}:{attempt}".encode()) % 1000) / 2000.0
        return int(raw * (0.5 + frac) * 1000)


def valid_task_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def valid_name(value: str) -> bool:
    return bool(_NAME_RE.fullmatch(value))


class IdGenerator:
    """Time-sortable task ids: 12 hex digits of milliseconds, then a per-process random prefix and
    a counter. Sortable by submission time, unique without coordination, cheap to make in bulk.

    The counter is an ``itertools.count`` (its ``next`` is atomic under the GIL: no lock), and the
    time part is formatted once per millisecond: a pipelining producer makes ids by the ten
    thousand a second, and each one used to cost more than sending it."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._count = itertools.count(int.from_bytes(os.urandom(2), "big") + 1)
        self._ms = -1
        self._head = ""

    def new(self) -> str:
        c = next(self._count) & 0xFFFFFFFFFF
        ms = time.time_ns() // 1_000_000
        head = self._head
        if ms != self._ms:
            # a thread racing here may use the previous millisecond: still unique (the counter)
            head = f"{ms:012x}{self._prefix}"
            self._head, self._ms = head, ms
        return f"{head}{c:010x}"

    def many(self, n: int) -> list[str]:
        head = f"{time.time_ns() // 1_000_000:012x}{self._prefix}"
        count = self._count
        return [f"{head}{next(count) & 0xFFFFFFFFFF:010x}" for _ in range(n)]


new_ids: Final = IdGenerator()
