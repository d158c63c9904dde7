"""Replies the state machine builds are bounded by bytes, not only by count; and the retention
scan's cursor belongs to one column family.

A client refuses a frame over its limit and drops the whole connection, so a count alone was not
enough: a claim of five 9.9 MB tasks dead-lettered them unrun (the worker dropped the reply, its
leases were requeued with the attempt counted, again and again), and big dead letters, long error
messages and 140,000 queues each made a list, an export page or stats that nobody could read.
"""

from __future__ import annotations

import msgspec
from tq.broker.commands import (
    CLAIM_MAX_BYTES,
    Cancel,
    Claim,
    CommandBatch,
    PauseQueue,
    RegisterWorker,
    Report,
    Submit,
    Tick,
)
from tq.broker.state import StateMachine
from tq.config import DEFAULT_FRAME_LIMIT
from tq.model import ErrorInfo, TaskState
from tq.protocol.codec import encode
from tq.protocol.messages import Leased, Outcome, TaskSpec
from tq.store import CF

NOW = 1_000_000


def _submit(
    sm: StateMachine,
    ids: list[str],
    payload: bytes = b"1",
    queue: str = "default",
    retries: int = 3,
) -> None:
    specs = [TaskSpec(i, "job", payload, queue, max_retries=retries) for i in ids]
    sm.apply(NOW, [Submit(specs)])


def _leased_ids(sm: StateMachine, cmd: Claim) -> list[str]:
    return [lt.task.id for lt in sm.apply(NOW, [cmd]).results[0]]


def _kill(sm: StateMachine, ids: list[str], error: ErrorInfo, now: int = NOW) -> None:
    """Lease ``ids`` (submitted with retries=0) and fail them: dead letters."""
    sm.apply(now, [RegisterWorker("w")])
    leased = sm.apply(now, [Claim("w", ["default"], len(ids), max_bytes=1 << 62)]).results[0]
    assert sorted(lt.task.id for lt in leased) == sorted(ids)
    outcomes = [Outcome(lt.task.id, lt.token, False, error=error) for lt in leased]
    sm.apply(now, [Report("w", outcomes)])


# --- 1. claims -----------------------------------------------------------------------------------


def test_a_claim_stops_leasing_once_its_payload_bytes_reach_the_budget(sm: StateMachine) -> None:
    _submit(sm, [f"t{i}" for i in range(6)], b"x" * 1000)
    # 1000 + 1000 < 2500 <= 3000: the third task reaches the budget, the claim stops there
    assert _leased_ids(sm, Claim("w", ["default"], 8, max_bytes=2500)) == ["t0", "t1", "t2"]
    # a budget smaller than one task still leases one: a big task must be claimable at all
    assert _leased_ids(sm, Claim("w", ["default"], 8, max_bytes=10)) == ["t3"]
    assert _leased_ids(sm, Claim("w", ["default"], 8, max_bytes=0)) == ["t4"]
    assert sm.counts["running"] == 5
    assert sm.counts["pending"] == 1


def test_a_claim_counts_the_error_a_retried_task_carries(sm: StateMachine) -> None:
    _submit(sm, ["a"], b"x")
    (lease,) = sm.apply(NOW, [Claim("w", ["default"], 1)]).results[0]
    error = ErrorInfo("E", "m" * 500, "t" * 500)
    sm.apply(NOW, [Report("w", [Outcome("a", lease.token, False, error=error)])])
    sm.apply(NOW + 10**7, [Tick()])  # the retry fell due: "a" is pending again, with its error
    _submit(sm, ["c"], b"x")
    # "a" alone is 1 byte of payload and a 1,001-character error: past the budget
    assert _leased_ids(sm, Claim("w", ["default"], 8, max_bytes=600)) == ["a"]
    assert _leased_ids(sm, Claim("w", ["default"], 8, max_bytes=600)) == ["c"]


def test_a_default_claim_of_big_tasks_fits_in_a_frame_the_worker_takes(sm: StateMachine) -> None:
    """Three 5 MiB tasks for eight free slots: two fit the default budget (half a default
    frame), and the reply is well under what a client's connection accepts."""
    assert CLAIM_MAX_BYTES == DEFAULT_FRAME_LIMIT // 2
    _submit(sm, ["big-0", "big-1", "big-2"], b"x" * (5 * 1024 * 1024))
    result = sm.apply(NOW, [Claim("w", ["default"], 8)]).results[0]
    assert [lt.task.id for lt in result] == ["big-0", "big-1"]
    assert len(encode(Leased(1, result))) < DEFAULT_FRAME_LIMIT
    assert _leased_ids(sm, Claim("w", ["default"], 8)) == ["big-2"]


def test_a_claims_budget_travels_with_the_command() -> None:
    """Every replica applies a claim with the budget the leader put in it."""
    batch = CommandBatch(NOW, [Claim("w", ["q"], 8, max_bytes=1234)])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=CommandBatch)
    assert decoded.commands[0] == Claim("w", ["q"], 8, max_bytes=1234)


# --- 2. dead letters -----------------------------------------------------------------------------


def test_dead_letters_leave_payloads_out_and_resume_after_a_cursor(sm: StateMachine) -> None:
    ids = [f"d{i}" for i in range(5)]
    _submit(sm, ids, b"p" * 100_000, retries=0)
    _kill(sm, ids, ErrorInfo("Boom", "bad"))
    tasks = sm.dead_letters()
    assert [t.id for t in tasks] == ids
    assert all(t.payload == b"" and t.error == ErrorInfo("Boom", "bad") for t in tasks)
    assert [t.id for t in sm.dead_letters(after="d1", limit=2)] == ["d2", "d3"]
    whole = sm.get_task("d0")  # status still shows a task whole
    assert whole is not None
    assert whole.payload == b"p" * 100_000


# --- 3. export -----------------------------------------------------------------------------------


def test_an_export_page_ends_at_its_byte_budget_and_the_cursor_goes_on(sm: StateMachine) -> None:
    ids = [f"e{i:02d}" for i in range(10)]
    _submit(sm, ids, retries=0)
    _kill(sm, ids, ErrorInfo("Long", "m" * 1000))
    states = [TaskState.DEAD]
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        rows, cursor = sm.history_page(states, None, 0, 0, 10_000, cursor, max_bytes=2500)
        pages.append([r.id for r in rows])
        if cursor is None:
            break
        assert len(pages) < 20, "the cursor does not move"
    # ~1,070 bytes a row: the third row reaches 2,500
    assert pages == [ids[0:3], ids[3:6], ids[6:9], ids[9:]]
    # one row over the budget alone still makes a page
    rows, cursor = sm.history_page(states, None, 0, 0, 10_000, None, max_bytes=1)
    assert ([r.id for r in rows], cursor) == (["e00"], "dead:e00")
    rows, cursor = sm.history_page(states, None, 0, 0, 10_000, None)  # no budget: all of them
    assert (len(rows), cursor) == (10, None)


# --- 4. stats ------------------------------------------------------------------------------------


def test_stats_leave_out_queues_with_nothing_to_show(sm: StateMachine) -> None:
    _submit(sm, ["a"], queue="emptied")
    sm.apply(NOW, [Cancel("a")])
    _submit(sm, ["b"], queue="claimed")
    sm.apply(NOW, [Claim("w", ["claimed"], 1)])
    _submit(sm, ["c"], queue="waiting")
    sm.apply(NOW, [PauseQueue("held", True)])
    sm.apply(NOW, [RegisterWorker("w2", queues=["watched"])])
    stats = sm.queue_stats()
    # running, paused, pending, a worker's
    assert sorted(stats) == ["claimed", "held", "waiting", "watched"]
    assert sm.queues_left_out == 0
    (lease,) = sm.leases.values()
    sm.apply(NOW, [Report("w", [Outcome("b", lease.token, True, b"1")])])
    assert sorted(sm.queue_stats()) == ["held", "waiting", "watched"]


def test_stats_list_a_bounded_number_of_queues_busiest_first(sm: StateMachine) -> None:
    specs = [TaskSpec(f"t{i}", "job", b"1", queue=f"q{i:03d}") for i in range(20)]
    specs += [TaskSpec(f"deep{i}", "job", b"1", queue="q019") for i in range(3)]
    sm.apply(NOW, [Submit(specs)])
    sm.apply(NOW, [Claim("w", ["q010"], 1)])  # q010 now has a running task and none pending
    stats = sm.queue_stats(limit=3)
    assert sm.queues_left_out == 17
    # the queue with a running task first, then the deepest, then by name
    assert list(stats) == ["q000", "q010", "q019"]
    assert stats["q010"].running == 1
    assert stats["q019"].pending["normal"] == 4
    assert len(sm.queue_stats()) == 20
    assert sm.queues_left_out == 0


# --- 5. retention --------------------------------------------------------------------------------


def _finished(sm: StateMachine, completed: list[str], cancelled: list[str], now: int) -> None:
    if completed:
        _submit(sm, completed)
        sm.apply(now, [RegisterWorker("w")])
        leased = sm.apply(now, [Claim("w", ["default"], len(completed))]).results[0]
        sm.apply(now, [Report("w", [Outcome(lt.task.id, lt.token, True, b"2") for lt in leased])])
    if cancelled:
        _submit(sm, cancelled)
        sm.apply(now, [Cancel(i) for i in cancelled])


def test_a_retention_cycle_visits_every_finished_task_once(sm: StateMachine) -> None:
    """A cursor from ``cancelled`` was used as a start key in ``completed`` (skipping the ids
    before it there), and ``cancelled`` started over at every run: the scan never ended."""
    completed = [f"a{i}" for i in range(5)]
    cancelled = [f"c{i}" for i in range(5)]
    _finished(sm, completed, cancelled, NOW)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        ids, cursor = sm.retention_candidates(NOW + 1, cursor, 3)
        seen += ids
        if cursor is None:
            break
    assert cursor is None, "the scan did not wrap around"
    assert seen == completed + cancelled
    assert sm.retention_candidates(NOW + 1, None, 100) == (completed + cancelled, None)


def test_retention_reaches_expired_cancelled_tasks_behind_live_ones(sm: StateMachine) -> None:
    _finished(sm, [], ["z-old"], NOW)  # expired
    _finished(sm, ["b-live"], [f"a-{i:02d}" for i in range(10)], NOW + 10_000)  # not yet
    found: list[str] = []
    cursor = None
    for _ in range(4):  # 12 records, 4 a run: the third run gets there
        ids, cursor = sm.retention_candidates(NOW + 1, cursor, 4)
        found += ids
        if ids:
            assert cursor is not None
            assert cursor[0] is CF.CANCELLED  # the family the cursor belongs to
    assert found == ["z-old"]
    assert cursor is None  # all twelve scanned: the next run starts over
