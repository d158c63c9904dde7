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
a client polls for its replies another way (``Connection._keep_awake`` in
tq/client/connection.py): it keeps the loop from sleeping, and the loop's own zero-timeout
polls read the reply, while everything else on that loop runs as it would have.

Why by hand: no library does this for an asyncio loop (uvloop does not expose libuv's idle
handles, and the loop's own epoll descriptor is private); it is one ``epoll`` of our sockets.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

# A client's spin_us (AsyncClient, tq bench --client-spin-us): a tenth of a second of polling is
# already far past any reply worth waiting for this way.
MAX_CLIENT_SPIN_US = 100_000
# Its default: over a sequential submit's round trip here (p50 0.3-0.45 ms, p99 ~1 ms), so most
# polls end in their reply; 250 µs, the broker's budget, ran out before most replies came.
CLIENT_SPIN_US = 1000


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
