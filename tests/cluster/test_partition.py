"""The leader cut off from the other two by the Raft proxy (its client port stays reachable): it
acknowledges nothing and steps down, the majority elects a leader and takes writes, and after the
heal every node converges to the same log with nothing acknowledged lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.conftest import MakeCluster
from tests.cluster.harness import (
    CLUSTER_HANDLERS_APP,
    ELECTION_TIMEOUT_MAX_S,
    Cluster,
    Node,
    RawReply,
    Writer,
    list_all,
    list_ids,
    raw_submit,
    spec_for,
)
from tests.cluster.history import History, executed_ids
from tests.conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.cluster

StartWorker = Callable[..., WorkerProcess]

# Step-down is due one leaderFallbackTimeout (= the max election timeout) after the last
# majority response; the slack covers the heartbeat period, the tick and a loaded machine.
STEP_DOWN_BUDGET_S = ELECTION_TIMEOUT_MAX_S + 0.8
NEW_LEADER_BUDGET_S = 5.0
PROBE_TIMEOUT_S = 1.0


@dataclass
class Cut:
    old: Node
    new: Node
    at: float
    step_down_s: float
    writes_resumed_s: float
    probe_ids: set[str]


def writer_for(cluster: Cluster, history: History, record: Path) -> Writer:
    return Writer(
        cluster.urls(),
        history,
        record,
        total=1_000_000,  # runs until stopped
        batch=50,
        lanes=2,
        attempt_timeout_s=2.0,
        give_up_s=60.0,
    )


def cut_the_leader(cluster: Cluster, history: History, record: Path) -> Cut:
    """Partition the current leader while the writer runs and check the minority side: every
    submit sent to the old leader's client port is refused or times out (never acknowledged),
    and within about one election timeout it refuses at once (it stepped down). Then wait for
    the majority's leader and for writes acknowledged after the cut."""
    proxy = cluster.proxy
    assert proxy is not None
    old = cluster.wait_stable_leader()
    majority = [n for n in cluster.nodes if n is not old]
    cut_at = history.note(f"partition {old.name} (leader)")
    proxy.partition(old.name)

    probes: list[tuple[float, float, str, RawReply]] = []
    stepped_down_at: float | None = None
    for i in range(50):
        if time.monotonic() - cut_at > STEP_DOWN_BUDGET_S + 2 * PROBE_TIMEOUT_S:
            break
        tid = f"old-leader-probe-{i}"
        history.attempt([tid])
        sent = time.monotonic()
        reply = raw_submit(old.url, spec_for(tid, record), PROBE_TIMEOUT_S)
        done = time.monotonic()
        probes.append((sent - cut_at, done - cut_at, tid, reply))
        assert reply.outcome != "ack", f"partitioned old leader acknowledged {tid}: {probes}"
        assert reply.outcome in ("nack", "timeout"), probes
        if reply.outcome == "nack":
            # OUTCOME_UNKNOWN: a probe it took before it stepped down (a later leader may
            # still commit it; the client would resend it by its id)
            assert reply.code in ("NOT_LEADER", "OUTCOME_UNKNOWN"), probes
            if (
                reply.code == "NOT_LEADER"
                and stepped_down_at is None
                and done - sent < PROBE_TIMEOUT_S / 2
            ):
                stepped_down_at = sent  # refused at once: it knows it does not lead
        if stepped_down_at is not None and len(probes) >= 5:
            break
        time.sleep(0.05)
    seen = [(round(a, 2), round(b, 2), str(r)) for a, b, _, r in probes]
    history.note(f"old leader probes (sent, done, reply): {seen}")
    view = old.cluster()
    assert view is not None
    assert view["role"] != "leader", view
    assert stepped_down_at is not None, f"old leader never refused promptly: {probes}"

    new = cluster.wait_leader(timeout=NEW_LEADER_BUDGET_S, among=majority)
    # A write the majority acknowledged, sent after the cut: the probe through the new leader.
    probe = f"majority-probe-{time.monotonic_ns()}"
    history.attempt([probe])
    resumed = wait_until(
        lambda: (
            raw_submit(new.url, spec_for(probe, record), 2.0).outcome == "ack" and time.monotonic()
        ),
        NEW_LEADER_BUDGET_S,
        what="a write acknowledged by the majority",
    )
    history.ack([probe], resumed)
    cut = Cut(
        old=old,
        new=new,
        at=cut_at,
        step_down_s=stepped_down_at - cut_at,
        writes_resumed_s=resumed - cut_at,
        probe_ids={p[2] for p in probes},
    )
    history.note(
        f"old leader refused {cut.step_down_s:.3f}s after the cut; majority leader {new.name} "
        f"acknowledged a write {cut.writes_resumed_s:.3f}s after the cut"
    )
    print(
        f"\npartition: old leader {old.name} refused writes {cut.step_down_s:.3f}s after the cut; "
        f"{new.name} elected, a write acknowledged {cut.writes_resumed_s:.3f}s after the cut"
    )
    assert cut.step_down_s < STEP_DOWN_BUDGET_S, f"old leader led for {cut.step_down_s:.2f}s"
    assert cut.writes_resumed_s < NEW_LEADER_BUDGET_S
    return cut


def test_partitioned_leader_acknowledges_nothing_and_majority_continues(
    make_cluster: MakeCluster,
    start_worker: StartWorker,
    record_file: Path,
    history: History,
) -> None:
    cluster = make_cluster(3, proxy=True)
    proxy = cluster.proxy
    assert proxy is not None
    writer = writer_for(cluster, history, record_file).start()
    writer.wait_acked(1000, timeout=30)
    cut = cut_the_leader(cluster, history, record_file)

    # While cut off, the old leader still acknowledges nothing, though the majority moves on.
    writer.wait_acked(history.acked_count + 500, timeout=30)
    history.attempt(["old-leader-probe-late"])
    late = raw_submit(cut.old.url, spec_for("old-leader-probe-late", record_file), PROBE_TIMEOUT_S)
    assert late.outcome in ("nack", "timeout"), late
    assert proxy.unidentified == 0, proxy.describe()

    history.note("heal")
    proxy.heal()
    leader = cluster.wait_leader(timeout=15)
    history.note(f"after heal: leader {leader.name}")
    writer.wait_acked(history.acked_count + 500, timeout=30)
    history.note("stopping writer")
    writer.stop()
    history.note("writer stopped")
    assert not writer.gave_up, writer.error_summary()

    # Nothing acknowledged is lost, and every acknowledged task runs.
    listed = list_all(cluster.urls())
    present = [tid for ids in listed.values() for tid in ids]
    history.assert_ok(present)
    # The deposed leader's own uncommitted entries were overwritten, never applied anywhere.
    probe_ids = cut.probe_ids | {"old-leader-probe-late"}
    assert not probe_ids & set(present), sorted(probe_ids & set(present))
    history.note("listed")
    worker = start_worker(cluster.urls(), "--burst", "-c", "64", app=CLUSTER_HANDLERS_APP)
    assert worker.wait(120) == 0, worker.describe()
    history.note("worker done")
    completed = list_ids(cluster.urls(), "completed")
    history.assert_ok(present, completed=completed, executed=executed_ids(record_file))


def test_after_heal_the_old_leader_converges(
    make_cluster: MakeCluster, record_file: Path, history: History
) -> None:
    """Regression (found at 57ec1ce, fixed in 675ed22): the deposed leader's log ends in
    entries of its old term that no one else has. The new leader, far ahead, pipelines several
    append_entries batches; the follower rejects the one that conflicts (reset next=prevLogIdx)
    and the later ones (reset next=its last index + 1): those stale resets must not undo the
    rewind, or the conflicting suffix is never overwritten and the node never catches up."""
    cluster = make_cluster(3, proxy=True)
    proxy = cluster.proxy
    assert proxy is not None
    writer = writer_for(cluster, history, record_file).start()
    writer.wait_acked(500, timeout=30)
    # The first probe reaches the old leader while it still leads: it appends an entry no one
    # else will ever have (a conflicting suffix, as any deposed leader may hold).
    cut = cut_the_leader(cluster, history, record_file)
    writer.wait_acked(history.acked_count + 2000, timeout=30)  # the majority moves well ahead
    history.note("heal")
    proxy.heal()
    cluster.wait_leader(timeout=15)
    writer.wait_acked(history.acked_count + 500, timeout=30)
    writer.stop()
    assert not writer.gave_up, writer.error_summary()

    state = cluster.wait_converged(timeout=20)
    history.note(f"converged: {state}")
    listed = list_all(cluster.urls())
    present = [tid for ids in listed.values() for tid in ids]
    history.assert_ok(present)
    assert not cut.probe_ids & set(present)
    assert sum(state["states"].values()) == len(present)
    old_view = cut.old.cluster()
    assert old_view is not None
    assert old_view["role"] == "follower"
