"""Replicas apply each entry with the settings of the node that accepted it (stamped on the
entry, like its clock), not their own flags: a follower started with another ``--lease`` gave a
claim another deadline, so its next tick expired what the others kept, and it diverged."""

from __future__ import annotations

from pathlib import Path

import msgspec
from tq.broker.cluster import ReplicatedState
from tq.broker.commands import (
    Claim,
    Command,
    CommandBatch,
    Extend,
    RegisterWorker,
    Submit,
    Tick,
)
from tq.broker.state import ApplyResult, StateMachine
from tq.model import RetryPolicy
from tq.protocol.messages import TaskSpec
from tq.store import Store

from tests.broker.support import dump_store

_enc = msgspec.msgpack.Encoder()


def _ignore(_result: ApplyResult) -> None:
    pass


def _replica(path: Path, lease_ms: int) -> ReplicatedState:
    store = Store(str(path))
    store.open()
    sm = StateMachine(
        store, lease_ms=lease_ms, heartbeat_timeout_ms=10_000, retry=RetryPolicy(base_s=0.5)
    )
    sm.recover()
    return ReplicatedState(sm, store, _ignore)


def test_a_follower_with_another_lease_applies_the_leaders_and_stays_identical(
    tmp_path: Path,
) -> None:
    leader, follower = _replica(tmp_path / "a", 30_000), _replica(tmp_path / "b", 3_000)
    entries: list[tuple[int, list[Command]]] = [
        (1_000, [RegisterWorker("w1"), Submit([TaskSpec("t1", "echo", b"1")])]),
        (2_000, [Claim("w1", ["default"], 1)]),
        (5_000, [Extend("w1", [])]),  # the worker is alive; its lease is 30 s, or 3 s
        (5_500, [Tick()]),
    ]
    for index, (now, cmds) in enumerate(entries, start=1):
        entry = _enc.encode(CommandBatch(now, cmds, leader.own_settings))
        leader.apply(index, entry)
        follower.apply(index, entry)
    assert leader.sm.counts["running"] == 1
    assert follower.sm.counts == leader.sm.counts
    assert dump_store(follower.store) == dump_store(leader.store)
    # an entry from before settings were stamped: each applies it with its own, as before
    old = _enc.encode(CommandBatch(6_000, [Submit([TaskSpec("t2", "echo", b"2")])]))
    follower.apply(5, old)
    assert follower.sm.settings == follower.own_settings
    leader.store.close()
    follower.store.close()
