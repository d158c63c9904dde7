"""Busy-polling for input that is about to arrive, instead of sleeping in the kernel for it.

Why: on these VMs an idle vCPU halts at once (``haltpoll.guest_halt_poll_ns=0``), and waking it
goes through the host: two processes bouncing a small message over loopback take ~100 µs a
round trip when both sleep in ``epoll_wait``, ~30 µs when the receiver polls
(benchmarks/README.md, "Why a wake-up costs so much here"). A sequential client pays that
wake-up on every request. So, like Linux's ``SO_BUSY_POLL``, Go's spinning scheduler threads
and glibc's adaptive mutexes, a ``Spinner`` polls for a bounded time before the event loop goes
to sleep. Only for a peer whose ``Pace`` says it answers within that time: a peer that pauses
longer costs nothing, and a busy peer's data is already there, so the poll returns at once. A
poll that finds nothing makes the next ones rarer (``Backoff``): a review measured a broker
whose single pace flag saw many slow clients' combined arrivals as one fast one (~40% more CPU
per submit, latency worse), and one sharing its loop with its client, where a poll can never
find anything. Between polls it yields the CPU, so on two cores the kernel's own workers (the
disk's completion, the loopback softirq) and the peer still run when they need to.

That is the broker's way: its loop is its own. A client's loop belongs to the application, so
a client polls for its replies another way (``ReplyPoll``): it keeps the loop from sleeping, and
the loop's own zero-timeout polls read the reply, while everything else on that loop runs as it
would have.

Why by hand: no library does this for an asyncio loop (uvloop does not expose libuv's idle
handles, and the loop's own epoll descriptor is private); it is one ``epoll`` of our sockets.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import time
from collections.abc import Callable

# A client's spin_us (AsyncClient, tq bench --client-spin-us): a tenth of a second of polling is
# already far past any reply worth waiting for this way.
MAX_CLIENT_SPIN_US = 100_000
# Its default: over a sequential submit's round trip here (p50 0.3-0.45 ms, p99 ~1 ms), so most
# polls end in their reply; 250 µs, the broker's budget, ran out before most replies came.
CLIENT_SPIN_US = 1000
# A sched_yield that returns after this long ran another task meanwhile (alone, it takes ~1 µs).
CONTENDED_NS = 200_000
# Involuntary context switches of the calling thread (Linux): a yield that raised it handed the
# CPU to another task. None where the OS does not count them per thread.
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


def _switches() -> int:
    return 0 if _RUSAGE_THREAD is None else resource.getrusage(_RUSAGE_THREAD).ru_nivcsw


class Pace:
    """Whether one peer answers within the budget: ``waiting`` when our reply has left,
    ``arrived`` when its next message comes, ``missed`` when a poll for it found nothing."""

    __slots__ = ("_budget_ns", "_since", "quick")

    def __init__(self, budget_ns: int) -> None:
        self._budget_ns = budget_ns
        self._since = 0  # monotonic ns when the current wait began; 0: none is open
        # At first: try. Unpolled, a wait takes longer by the wake-up a poll saves, so a peer
        # just over the budget unpolled would never be polled for if this started False.
        self.quick = True

    def waiting(self, now_ns: int) -> None:
        self._since = now_ns

    def arrived(self, now_ns: int) -> None:
        if self._since:
            self.quick = now_ns - self._since <= self._budget_ns
            self._since = 0

    def missed(self) -> None:
        self.quick = False  # until a wait ends within the budget again


class Backoff:
    """After a poll that found nothing, skip the next 1, then 3, 7, ... up to 63 polls; a poll
    that finds something resets it. Bounds what polls that keep missing cost (a broker sharing
    its loop with its client: every poll misses) to about 1/64 of them."""

    __slots__ = ("_misses", "_skip")

    def __init__(self) -> None:
        self._misses = 0
        self._skip = 0

    def allow(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    def hit(self) -> None:
        self._misses = 0

    def miss(self) -> None:
        self._misses = min(self._misses + 1, 6)
        self._skip = (1 << self._misses) - 1


def poll_until(ready: Callable[[], bool], budget_ns: int, backoff: Backoff) -> bool | None:
    """Call ``ready`` until it says yes (True) or ``budget_ns`` has passed (False), yielding the
    CPU between calls; None at once, without calling it, while ``backoff`` says skip. The one
    loop both polls use: the broker's for the next request, the journal's for its write."""
    if not backoff.allow():
        return None
    end = time.monotonic_ns() + budget_ns
    while True:
        if ready():
            backoff.hit()
            return True
        if time.monotonic_ns() >= end:
            backoff.miss()
            return False
        os.sched_yield()


class Spinner:
    """Polls the descriptors it is given, for at most ``budget_us`` per ``spin``."""

    def __init__(self, budget_us: int) -> None:
        if budget_us < 0:
            raise ValueError(f"spin budget must be >= 0 µs, not {budget_us}")
        self.budget_ns = budget_us * 1000
        self._epoll = select.epoll() if budget_us else None
        self._owners: dict[int, object] = {}  # fd -> who added it (see discard)
        self._backoff = Backoff()
        self.spins = 0  # spins that polled
        self.hits = 0  # ... and saw input before the budget ran out

    @property
    def enabled(self) -> bool:
        return self._epoll is not None

    def pace(self) -> Pace:
        """A new peer's pace, judged against this spinner's budget."""
        return Pace(self.budget_ns)

    def add(self, fd: int, owner: object) -> None:
        """Poll ``fd`` (a socket ``owner`` reads from) too."""
        if self._epoll is None or fd < 0:
            return
        self._owners[fd] = owner
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)  # the same socket added again

    def discard(self, fd: int, owner: object) -> None:
        """Stop polling ``fd`` if ``owner`` still has it. The event loop closes a socket before
        it reports the connection lost, so by then the number may be a new connection's."""
        if self._epoll is None or fd < 0 or self._owners.get(fd) is not owner:
            return
        del self._owners[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed already, which removed it

    def spin(self) -> bool | None:
        """Poll until a descriptor is readable (True) or the budget is spent (False). Returns
        None at once, without polling, when disabled or backing off after polls that missed."""
        if self._epoll is None:
            return None
        poll = self._epoll.poll
        found = poll_until(lambda: bool(poll(0)), self.budget_ns, self._backoff)
        if found is not None:
            self.spins += 1
            self.hits += found
        return found

    def close(self) -> None:
        self._owners.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


class ReplyPoll:
    """A client connection's poll for its replies (``AsyncClient(spin_us=...)``): after a
    request goes out, keep the event loop from sleeping until the reply is read, the budget is
    spent, or ``due`` (the connection's say) turns false. A callback that yields the CPU and
    puts itself back on the ready queue makes every pass of the loop poll its descriptors with
    a zero timeout, so the reply is read as soon as it lands, and the loop's other work (other
    sockets, timers, tasks) runs as it would have, never held up."""

    def __init__(self, budget_us: int, due: Callable[[], bool]) -> None:
        self.budget_ns = budget_us * 1000  # 0: never polls
        self._due = due
        self._pace = Pace(self.budget_ns)  # do the broker's replies come within it
        self._replied = 0  # monotonic ns of the last read from the broker
        self._end = 0  # monotonic ns when the current poll gives up
        self._switches = 0  # this thread's involuntary switches when last looked at
        self._passes = 0  # yields in the current poll
        self._handed = 0  # ... that handed the CPU to another task
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduled = False  # a pass is on the loop's ready queue
        self.spins = 0  # polls started
        self.rounds = 0  # passes of the loop kept from sleeping
        self.misses = 0  # polls that ran out before the reply came
        self.yields = 0  # ... that ended because another task wanted the CPU

    def arrived(self, now_ns: int) -> None:
        """Something was read from the broker."""
        self._replied = now_ns
        self._pace.arrived(now_ns)

    def sent(self, alone: bool) -> None:
        """A request the broker answers at once has left; ``alone``: nothing else in flight."""
        now = time.monotonic_ns()
        self._pace.waiting(now)
        # Only for a caller waiting for each reply in turn (this request alone in flight): with
        # more in flight the caller is after throughput, and its replies keep coming without a
        # wake-up each. And only back to back: after an idle gap the broker's CPU and the disk
        # have gone to sleep too, and the reply comes too late for polling to pay (measured, 5
        # ms between submits: p50 0.69 against 0.66-0.68 ms, for 2.4x the CPU).
        recent = now - self._replied <= self.budget_ns
        if alone and recent and self._pace.quick and not self.scheduled:
            self.scheduled = True
            self._end = now + self.budget_ns
            self._switches = _switches()
            self._passes = self._handed = 0
            self.spins += 1
            self._loop = loop = asyncio.get_running_loop()
            loop.call_soon(self._pass)

    def _pass(self) -> None:
        # Cleared first: what raises in here (a Ctrl-C in the yield, caught by an application
        # that runs its own loop and goes on) must not leave the flag set with no pass queued,
        # which would turn polling off for good on this connection (a review found it).
        self.scheduled = False
        self.rounds += 1
        if not self._due():
            return
        now = time.monotonic_ns()
        if now >= self._end:
            self._pace.missed()
            self.misses += 1
            return
        os.sched_yield()  # the broker, or the kernel's softirq, may need this CPU
        took = time.monotonic_ns() - now
        switches = _switches()
        self._passes += 1
        if switches != self._switches:
            self._switches = switches
            self._handed += 1
        # Another task wants this CPU: one yield gave it away for long (16 processes polling
        # on 2 CPUs measured 15-33% fewer submits in all), or most yields hand it over (the
        # broker's own loop on this CPU: the poll then only slows the broker down, 0.41-0.43
        # against 0.40 ms without polling; on the other CPU 1.4 yields in ~28 do, and polling
        # gives 0.29-0.31 ms). The loop may then sleep; the next request polls again.
        shared = self._handed >= 2 and 2 * self._handed >= self._passes
        if took >= CONTENDED_NS or shared:
            self.yields += 1
            return
        assert self._loop is not None
        self._loop.call_soon(self._pass)
        self.scheduled = True  # after: a second pass would be harmless
