"""A follower killed during 10,000 writes comes back after the leader compacted its log past the
follower's last entry (compaction every 1,000 entries): it can only catch up by installing the
leader's snapshot, and it ends with exactly the state of the others."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.conftest import MakeCluster
from tests.cluster.harness import Writer, list_all
from tests.cluster.history import History
from tests.conftest import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

WRITES = 10_000
COMPACTION_ENTRIES = 1_000  # --raft-compaction-entries (PySyncObj's logCompactionMinEntries)
KILL_AFTER = 1_000  # acknowledged writes


def test_follower_restarted_after_compaction_installs_a_snapshot(
    make_cluster: MakeCluster, record_file: Path, history: History
) -> None:
    cluster = make_cluster(
        3,
        extra_args=(
            "--heartbeat-timeout",
            "2",
            "--retry-base",
            "0.05",
            "--raft-compaction-entries",
            str(COMPACTION_ENTRIES),
        ),
    )
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    # Single-task submits from a few lanes: the broker makes one Raft entry per tick, so few
    # lanes mean few tasks per entry and enough entries for the log to pass the compaction mark.
    writer = Writer(
        cluster.urls(), history, record_file, total=10 * WRITES, batch=1, lanes=8, give_up_s=60
    ).start()
    writer.wait_acked(KILL_AFTER, timeout=60)
    cluster.kill(follower)
    at_kill = leader.cluster()
    assert at_kill is not None
    taken_at_kill = at_kill["snapshots_taken"]
    # The follower's log ends at most a few in-flight entries after the leader's commit index.
    follower_end = at_kill["commit_index"] + 50
    history.note(f"killed follower {follower.name}; leader commit {at_kill['commit_index']}")

    def compacted_past_follower() -> dict[str, object] | None:
        view = leader.cluster()
        if view is None or view["role"] != "leader":
            raise AssertionError(f"leadership moved during the load: {view}")
        done = (
            history.acked_count >= WRITES
            and view["snapshots_taken"] > taken_at_kill
            and view["commit_index"] > follower_end + COMPACTION_ENTRIES
        )
        return view if done else None

    view = wait_until(
        compacted_past_follower, 150, interval=0.2, what="the leader compacting past the follower"
    )
    history.note(f"leader compacted: {view}")

    restart_at = time.monotonic()
    cluster.restart(follower)
    history.note(f"restarted {follower.name}")
    target = leader.cluster()
    assert target is not None

    def caught_up() -> bool:
        v = follower.cluster()
        return v is not None and v["applied_index"] >= target["applied_index"]

    wait_until(caught_up, 60, interval=0.05, what=f"{follower.name} catching up")
    catch_up_s = time.monotonic() - restart_at
    writer.stop()
    assert not writer.gave_up, writer.error_summary()

    state = cluster.wait_converged(timeout=30)
    fview = follower.cluster()
    assert fview is not None
    print(
        f"\nsnapshot: {history.acked_count} writes; leader commit {state['commit_index']}, "
        f"{view['snapshots_taken']} snapshots taken; {follower.name} restarted "
        f"{fview['snapshots_restored']} snapshot(s), caught up in {catch_up_s:.2f}s "
        f"(incl. process start)"
    )
    assert fview["snapshots_restored"] >= 1, f"no snapshot installed: {fview}"
    listed = list_all(cluster.urls())
    present = [tid for ids in listed.values() for tid in ids]
    history.assert_ok(present)
    assert sum(state["states"].values()) == len(present) == history.acked_count
