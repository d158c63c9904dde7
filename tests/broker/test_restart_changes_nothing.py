"""A restart changes nothing: a state machine closed, reopened and recovered at any point applies
every later command exactly as one that never stopped, the same results and the same store bytes.

This is what keeps a Raft replica that was killed and restarted identical to the others. Unlike
the model-based machines of test_state_machine.py, there is no model here, so every command
type is drawn (workers registering, retention, dead-letter retries and purges, pauses,
announcements), over a small pool of task ids so that ids come back after retention frees them:
the paths where memory and store could part.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from tq.broker.commands import (
    Announce,
    Cancel,
    Claim,
    Command,
    Extend,
    PauseQueue,
    PurgeDead,
    RegisterWorker,
    Release,
    Report,
    Retention,
    RetryDead,
    Submit,
    Tick,
    WorkerLost,
)
from tq.broker.state import StateMachine
from tq.model import ErrorInfo
from tq.protocol.messages import LeaseRef, Outcome, TaskSpec
from tq.store import Store

from tests.broker.support import dump_store, normalize

IDS = [f"t{i}" for i in range(8)]
QUEUES = ["a", "b"]
WORKERS = ["w1", "w2", "w3"]
LEASE_MS, HEARTBEAT_TIMEOUT_MS = 8_000, 6_000
START_MS = 1_700_000_000_000
STEPS = 40
KINDS = ["submit"] * 4 + ["claim"] * 3 + ["report"] * 3 + ["extend"] * 2 + ["tick"] * 3
KINDS += ["register", "lost", "release", "cancel", "retention", "pause", "retry_dead"]
KINDS += ["purge_dead", "announce"]


class Replica:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="tq-restart-")
        self.store = Store(f"{self.root}/store")
        self.store.open()
        self.sm = self._machine()

    def _machine(self) -> StateMachine:
        return StateMachine(
            self.store, lease_ms=LEASE_MS, heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS
        )

    def restart(self) -> None:
        self.store.close()
        self.store = Store(f"{self.root}/store")
        self.store.open()
        self.sm = self._machine()
        self.sm.recover()

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


def command(data: st.DataObject, sm: StateMachine, now: int) -> Command:
    """One command of any type, drawn from what ``sm`` holds now (live and stale leases)."""
    draw = data.draw
    leases = sorted(sm.leases.items())
    kind = draw(st.sampled_from(KINDS))
    if kind == "submit":
        return Submit(
            [
                TaskSpec(
                    id=draw(st.sampled_from(IDS)),
                    name="job",
                    payload=b"x",
                    queue=draw(st.sampled_from(QUEUES)),
                    priority=draw(st.sampled_from([0, 1, 2])),
                    max_retries=draw(st.sampled_from([0, 1, 2])),
                    backoff_s=draw(st.sampled_from([0.0, 0.2, 1.0])),
                )
                for _ in range(draw(st.integers(1, 3)))
            ]
        )
    if kind == "claim":
        queues = draw(st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True))
        return Claim(draw(st.sampled_from(WORKERS)), queues, draw(st.integers(1, 3)))
    if kind in ("report", "release") and leases:
        task_id, lease = draw(st.sampled_from(leases))
        worker = lease.worker_id if draw(st.booleans()) else draw(st.sampled_from(WORKERS))
        token = lease.token + draw(st.sampled_from([0, 0, 0, 100]))
        if kind == "release":
            return Release(worker, [LeaseRef(task_id, token)])
        ok = draw(st.booleans())
        error = None if ok else ErrorInfo("E", "failed")
        return Report(worker, [Outcome(task_id, token, ok, b"r" if ok else None, error)])
    if kind == "extend":
        worker = draw(st.sampled_from(WORKERS))
        mine = [LeaseRef(t, lease.token) for t, lease in leases if lease.worker_id == worker]
        return Extend(worker, draw(st.lists(st.sampled_from(mine), unique=True)) if mine else [])
    if kind == "register":
        queues = draw(st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True))
        return RegisterWorker(draw(st.sampled_from(WORKERS)), "host", 7, 4, queues)
    if kind == "lost":
        return WorkerLost(draw(st.sampled_from(WORKERS)))
    if kind == "cancel":
        return Cancel(draw(st.sampled_from(IDS)))
    if kind == "retention":
        cutoff = now + draw(st.sampled_from([-10_000, 1, 100_000]))
        return Retention(cutoff, draw(st.lists(st.sampled_from(IDS), min_size=1, unique=True)))
    if kind == "pause":
        return PauseQueue(draw(st.sampled_from(QUEUES)), draw(st.booleans()))
    if kind == "retry_dead":
        return RetryDead(draw(st.lists(st.sampled_from(IDS), min_size=1, unique=True)))
    if kind == "purge_dead":
        return PurgeDead(draw(st.lists(st.sampled_from(IDS), min_size=1, unique=True)))
    if kind == "announce":
        return Announce(f"n{draw(st.integers(1, 3))}", f"tcp://x{draw(st.integers(1, 3))}")
    return Tick()


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_restarted_machine_applies_like_the_one_that_never_stopped(
    data: st.DataObject,
) -> None:
    live, restarted = Replica(), Replica()
    try:
        now = START_MS
        for _ in range(STEPS):
            now += data.draw(st.sampled_from([0, 1, 50, 500, 1_500, 2_500, 4_000]), label="ms")
            commands = [command(data, live.sm, now) for _ in range(data.draw(st.integers(1, 3)))]
            if data.draw(st.integers(0, 5), label="restart") == 0:
                restarted.restart()
            got = normalize(restarted.sm.apply(now, commands).results)
            assert got == normalize(live.sm.apply(now, commands).results), commands
            assert dump_store(restarted.store) == dump_store(live.store), commands
            assert restarted.sm.next_deadline_ms() == live.sm.next_deadline_ms()
    finally:
        live.close()
        restarted.close()
