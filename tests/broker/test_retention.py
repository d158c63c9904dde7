"""Retention deletes finished tasks older than the cutoff, whatever their ids, and nothing else."""

from __future__ import annotations

from tq.broker.commands import Cancel, Claim, RegisterWorker, Report, Retention, Submit
from tq.broker.state import StateMachine
from tq.protocol.messages import Outcome, TaskSpec


def _finish(sm: StateMachine, now: int, *ids: str) -> None:
    sm.apply(now, [Submit([TaskSpec(i, "echo", b"1") for i in ids])])
    sm.apply(now, [RegisterWorker("w")])
    leased = sm.apply(now, [Claim("w", ["default"], len(ids))]).results[0]
    outcomes = [Outcome(lt.task.id, lt.token, True, b"2") for lt in leased]
    sm.apply(now, [Report("w", outcomes)])


def test_retention_deletes_old_finished_tasks_with_any_id(sm: StateMachine) -> None:
    _finish(sm, 1_000, "job-42", "zzz-caller-chosen")
    _finish(sm, 9_000, "recent")
    sm.apply(1_000, [Submit([TaskSpec("still-pending", "echo", b"1")])])
    sm.apply(1_000, [Submit([TaskSpec("cancelled-early", "echo", b"1")])])
    sm.apply(1_500, [Cancel("cancelled-early")])

    ids, cursor = sm.retention_candidates(5_000, None, 100)
    assert sorted(ids) == ["cancelled-early", "job-42", "zzz-caller-chosen"]
    assert cursor is None  # everything scanned
    deleted = sm.apply(10_000, [Retention(5_000, ids)]).results[0]

    assert deleted == 3
    for gone in ids:
        assert sm.get_task(gone) is None
    assert sm.get_task("recent") is not None
    assert sm.get_task("still-pending") is not None
    assert sm.counts["completed"] == 1
    assert sm.counts["cancelled"] == 0


def test_retention_leaves_a_task_that_finished_after_the_cutoff(sm: StateMachine) -> None:
    _finish(sm, 9_000, "late")
    assert sm.apply(10_000, [Retention(5_000, ["late", "unknown"])]).results[0] == 0
    assert sm.get_task("late") is not None


def test_retention_scan_resumes_where_it_stopped(sm: StateMachine) -> None:
    _finish(sm, 1_000, *(f"t{i:02d}" for i in range(10)))
    first, cursor = sm.retention_candidates(5_000, None, 4)
    assert len(first) == 4
    assert cursor is not None
    second, _ = sm.retention_candidates(5_000, cursor, 100)
    assert not set(first) & set(second)
    assert len(first) + len(second) == 10
