"""The live model behind ``tq top``: everything the screens show, fed by ``WatchUpdate`` s.

Pure state, no I/O and no clock: every age is measured against the broker's own ``at_ms`` of the
latest update, so the same updates always render the same screens (the snapshot tests rely on
it). The feed (:mod:`tq.tui.feed`) is the only writer; the screens only read.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from tq.protocol.messages import QueueStats, Stats, TaskEvent, WatchUpdate, WorkerInfo

HISTORY_S: Final = 300.0  # sparklines cover the last five minutes
MAX_SAMPLES: Final = 600  # per queue: one a snapshot, bounded whatever the interval
MAX_EVENTS: Final = 500  # the recent-events list
MAX_PROGRESS: Final = 10_000  # tasks whose latest progress is remembered
GONE_KEEP_MS: Final = 120_000  # a worker that left stays on the Workers screen this long
SILENT_AFTER_MS: Final = 6_000  # three missed heartbeats (workers beat every 2 s)


@dataclass(frozen=True, slots=True)
class RateSample:
    at_ms: int
    rate_in: float
    rate_out: float


@dataclass(frozen=True, slots=True)
class Progress:
    """The latest progress event seen for one task."""

    detail: str
    at_ms: int
    worker_id: str


@dataclass(slots=True)
class Connection:
    """What the status bar says about the link to the broker."""

    connected: bool = False
    attempt: int = 0  # failed (re)connects in a row
    retry_in_s: float = 0.0
    error: str = ""
    ever_connected: bool = False
    connecting: bool = False  # an attempt is under way (after the wait of retry_in_s)


@dataclass(frozen=True, slots=True)
class GoneWorker:
    info: WorkerInfo
    gone_at_ms: int


@dataclass(slots=True)
class LiveModel:
    stats: Stats | None = None
    at_ms: int = 0  # the broker's clock at the latest update
    connection: Connection = field(default_factory=Connection)
    rates: dict[str, deque[RateSample]] = field(default_factory=dict)
    progress: OrderedDict[str, Progress] = field(default_factory=OrderedDict)
    events: deque[TaskEvent] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    gone: dict[str, GoneWorker] = field(default_factory=dict)
    peer_contact_ms: dict[str, int] = field(default_factory=dict)
    coalesced: int = 0
    dropped: int = 0
    generation: int = 0  # bumped by every update: screens redraw when it moved
    events_seen: int = 0  # bumped per event: the task lists refresh when it moved
    links: int = 0  # bumped by every (re)connect: so do the task lists

    # --- writing (the feed) ----------------------------------------------------------------------

    def apply(self, update: WatchUpdate) -> None:
        self.at_ms = max(self.at_ms, update.at_ms)
        if update.stats is not None:
            self._snapshot(update.stats)
        for event in update.events:
            self._event(event)
        self.events_seen += len(update.events)
        self.coalesced += update.coalesced
        self.dropped = update.dropped
        self.generation += 1

    def _snapshot(self, stats: Stats) -> None:
        previous = self.stats
        self.stats = stats
        for name, qs in stats.queues.items():
            samples = self.rates.get(name)
            if samples is None:
                samples = self.rates[name] = deque(maxlen=MAX_SAMPLES)
            samples.append(RateSample(self.at_ms, qs.rate_in, qs.rate_out))
            while samples and samples[0].at_ms < self.at_ms - HISTORY_S * 1000:
                samples.popleft()
        live = {w.id for w in stats.workers}
        if previous is not None:
            for w in previous.workers:
                if w.id not in live and w.id not in self.gone:
                    self.gone[w.id] = GoneWorker(w, self.at_ms)
        for wid in [k for k, g in self.gone.items() if k in live]:
            del self.gone[wid]
        for wid in [k for k, g in self.gone.items() if self.at_ms - g.gone_at_ms > GONE_KEEP_MS]:
            del self.gone[wid]
        for addr, peer in (stats.cluster.get("peers") or {}).items():
            if peer.get("connected"):
                self.peer_contact_ms[addr] = self.at_ms

    def _event(self, event: TaskEvent) -> None:
        self.events.append(event)
        if event.kind == "progress":
            self.progress[event.task_id] = Progress(event.detail, event.at_ms, event.worker_id)
            self.progress.move_to_end(event.task_id)
            while len(self.progress) > MAX_PROGRESS:
                self.progress.popitem(last=False)

    def connected(self) -> None:
        self.connection = Connection(connected=True, ever_connected=True)
        self.links += 1
        self.generation += 1

    def reconnecting(self) -> None:
        """A (re)connect attempt is under way: it may take seconds (the client tries for up to
        its connect timeout), so the status bar says so rather than a countdown long expired."""
        self.connection.connecting = True
        self.generation += 1

    def disconnected(self, error: str, attempt: int, retry_in_s: float) -> None:
        self.connection = Connection(
            connected=False,
            attempt=attempt,
            retry_in_s=retry_in_s,
            error=error,
            ever_connected=self.connection.ever_connected,
        )
        self.generation += 1

    # --- reading (the screens) -------------------------------------------------------------------

    def queues(self) -> dict[str, QueueStats]:
        return dict(self.stats.queues) if self.stats is not None else {}

    def queue_names(self) -> list[str]:
        return sorted(self.stats.queues) if self.stats is not None else []

    def queue(self, name: str) -> QueueStats | None:
        """One queue, without copying them all (there may be thousands)."""
        return self.stats.queues.get(name) if self.stats is not None else None

    def rate_history(self, queue: str) -> list[RateSample]:
        return list(self.rates.get(queue, ()))

    def worker_status(self, worker: WorkerInfo) -> str:
        """``ok``, ``busy`` (every slot in use) or ``silent`` (missed its heartbeats)."""
        if worker.last_heartbeat_ms and self.at_ms - worker.last_heartbeat_ms > SILENT_AFTER_MS:
            return "silent"
        if worker.concurrency and worker.running >= worker.concurrency:
            return "busy"
        return "ok"

    def latest_progress(self, task_id: str) -> Progress | None:
        return self.progress.get(task_id)

    def list_version(self) -> tuple[int, int]:
        """How fresh a list fetched from the broker is: fetch it again when this moved. Task
        events move it, and so does every reconnect: a broker that restarted, or was out of
        reach for a while, may have changed any task without an event reaching us."""
        return (self.events_seen, self.links)
