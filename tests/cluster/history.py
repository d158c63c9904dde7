"""The history checker every fault test uses.

A :class:`History` records, thread-safely, what the clients saw:

* ``attempt(ids)``: a submit carrying these ids was sent (its outcome may stay unknown: a timeout,
  a lost connection, a leader that stepped down);
* ``ack(ids)``: the broker acknowledged them (durable, replicated);
* ``note(text)``: a fault the test injected (kill, partition, heal...), for the report.

What the cluster has at the end comes from the brokers (ids listed from the leader, state counts
from every node) and from the workers (``executed_ids``: the ``cluster.mark`` handler appends the id
of every run to a file). :meth:`History.check` then states the at-least-once contract:

* every acknowledged id is present in the cluster (nothing acknowledged is lost);
* every id present was submitted by this test (nothing invented; an attempted but unacknowledged
  id may or may not be present: that is the client's "unknown outcome");
* no id is listed twice (a resubmit with the same id creates no second task);
* when completions are given: every acknowledged id completed, and every acknowledged id was run
  by a worker at least once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


def executed_ids(path: Path) -> Counter[str]:
    """Ids the ``cluster.mark`` handler recorded, with how many times each ran."""
    if not path.exists():
        return Counter()
    return Counter(line for line in path.read_text().splitlines() if line)


def _sample(ids: Iterable[str], n: int = 5) -> list[str]:
    return sorted(ids)[:n]


@dataclass
class Verdict:
    acked: int
    present: int
    missing: set[str] = field(default_factory=set)  # acknowledged, not in the cluster
    invented: set[str] = field(default_factory=set)  # in the cluster, never submitted
    duplicated: set[str] = field(default_factory=set)  # listed more than once
    unknown_present: int = 0  # attempted, not acknowledged, but present (allowed)
    not_completed: set[str] = field(default_factory=set)  # acknowledged, not completed
    not_executed: set[str] = field(default_factory=set)  # acknowledged, never run by a worker
    executed_twice: int = 0  # ran more than once (allowed: at-least-once)

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.invented
            or self.duplicated
            or self.not_completed
            or self.not_executed
        )

    def summary(self) -> str:
        parts = [f"acked={self.acked} present={self.present}"]
        for name in ("missing", "invented", "duplicated", "not_completed", "not_executed"):
            ids: set[str] = getattr(self, name)
            if ids:
                parts.append(f"{name}={len(ids)} e.g. {_sample(ids)}")
        parts.append(f"unknown_present={self.unknown_present}")
        parts.append(f"executed_twice={self.executed_twice}")
        return " ".join(parts)


class History:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempted: set[str] = set()
        self.acked: dict[str, float] = {}  # id -> monotonic time of its acknowledgement
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()

    def attempt(self, ids: Iterable[str]) -> None:
        with self._lock:
            self.attempted.update(ids)

    def ack(self, ids: Iterable[str], at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        with self._lock:
            for tid in ids:
                self.attempted.add(tid)
                self.acked.setdefault(tid, at)

    def note(self, text: str) -> float:
        at = time.monotonic()
        with self._lock:
            self.events.append((at, text))
        return at

    @property
    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def acked_ids(self) -> set[str]:
        with self._lock:
            return set(self.acked)

    def acked_before(self, t: float) -> list[str]:
        with self._lock:
            return [tid for tid, at in self.acked.items() if at < t]

    def first_ack_after(self, t: float) -> float | None:
        with self._lock:
            later = [at for at in self.acked.values() if at > t]
        return min(later) if later else None

    def describe(self) -> str:
        with self._lock:
            lines = [f"{at - self.t0:8.3f}s {text}" for at, text in self.events]
            lines.append(f"attempted={len(self.attempted)} acked={len(self.acked)}")
        return "\n".join(lines)

    def check(
        self,
        present: Iterable[str],
        *,
        completed: Iterable[str] | None = None,
        executed: Counter[str] | None = None,
    ) -> Verdict:
        listed = list(present)
        counts = Counter(listed)
        present_set = set(counts)
        with self._lock:
            acked = set(self.acked)
            attempted = set(self.attempted)
        v = Verdict(acked=len(acked), present=len(present_set))
        v.missing = acked - present_set
        v.invented = present_set - attempted
        v.duplicated = {tid for tid, n in counts.items() if n > 1}
        v.unknown_present = len((present_set & attempted) - acked)
        if completed is not None:
            v.not_completed = acked - set(completed)
        if executed is not None:
            v.not_executed = acked - set(executed)
            v.executed_twice = sum(1 for tid, n in executed.items() if n > 1)
        return v

    def assert_ok(
        self,
        present: Iterable[str],
        *,
        completed: Iterable[str] | None = None,
        executed: Counter[str] | None = None,
    ) -> Verdict:
        v = self.check(present, completed=completed, executed=executed)
        assert v.ok, f"history check failed: {v.summary()}\n{self.describe()}"
        return v
