"""The live model and the text helpers on their own: no broker, no app."""

from __future__ import annotations

import time

from tq.protocol.messages import QueueStats, Stats, TaskEvent, WatchUpdate, WorkerInfo
from tq.tui import humanize, safe
from tq.tui.data import GONE_KEEP_MS, HISTORY_S, LiveModel


def stats(workers: list[WorkerInfo], rate: float = 1.0) -> Stats:
    return Stats({}, {"q": QueueStats({"normal": 1}, rate_in=rate, rate_out=rate)}, workers)


def test_rate_history_keeps_only_the_last_five_minutes() -> None:
    m = LiveModel()
    for i in range(1000):
        m.apply(WatchUpdate(1, stats([], rate=i), [], 0, 0, i * 1000))
    history = m.rate_history("q")
    assert history[-1].rate_in == 999
    assert history[0].at_ms >= 999_000 - HISTORY_S * 1000


def test_a_worker_that_left_is_kept_as_gone_for_a_while() -> None:
    w = WorkerInfo("w1", last_heartbeat_ms=1000)
    m = LiveModel()
    m.apply(WatchUpdate(1, stats([w]), [], 0, 0, 1000))
    m.apply(WatchUpdate(1, stats([]), [], 0, 0, 2000))
    assert list(m.gone) == ["w1"]
    m.apply(WatchUpdate(1, stats([]), [], 0, 0, 2000 + GONE_KEEP_MS + 1))
    assert m.gone == {}


def test_a_worker_missing_heartbeats_is_silent() -> None:
    m = LiveModel()
    m.apply(WatchUpdate(1, stats([]), [], 0, 0, 20_000))
    assert m.worker_status(WorkerInfo("w", concurrency=2, last_heartbeat_ms=19_000)) == "ok"
    assert m.worker_status(WorkerInfo("w", concurrency=2, last_heartbeat_ms=1_000)) == "silent"


def test_latest_progress_per_task_is_remembered() -> None:
    m = LiveModel()
    events = [
        TaskEvent("progress", "t1", "n", "q", 1, 1, "w", "33% step 1"),
        TaskEvent("progress", "t1", "n", "q", 2, 1, "w", "67% step 2"),
    ]
    m.apply(WatchUpdate(1, None, events, 0, 0, 2))
    progress = m.latest_progress("t1")
    assert progress is not None
    assert progress.detail == "67% step 2"
    assert m.events_seen == 2


def test_pretty_json_of_a_10_mib_value_is_cut_and_cheap() -> None:
    huge = {"rows": [{"i": i, "text": "x" * 100} for i in range(100_000)]}  # ~12 MB as JSON
    t0 = time.perf_counter()
    text, cut = humanize.pretty(huge)
    assert cut
    assert len(text) <= humanize.PRETTY_LIMIT_CHARS
    assert time.perf_counter() - t0 < 0.5
    assert humanize.pretty({"a": 1}) == ('{\n  "a": 1\n}', False)


def test_sparkline_and_ages_read_at_a_glance() -> None:
    assert humanize.spark([0, 1, 2, 4, 8], 5) == "▁▁▂▄█"
    assert humanize.spark([], 3) == "   "
    assert humanize.spark([2, 2], 2) == "▄▄"
    assert [humanize.age(ms) for ms in (5, 5_000, 65_000, 3_725_000)] == [
        "5ms",
        "5s",
        "1m05s",
        "1h02m",
    ]


def test_a_reconnect_moves_the_list_version_like_an_event_does() -> None:
    m = LiveModel()
    m.connected()
    first = m.list_version()
    m.disconnected("connection to broker lost", 1, 0.5)
    m.reconnecting()
    assert m.list_version() == first  # nothing known to have changed yet
    m.connected()
    assert m.list_version() != first


def test_control_characters_are_escaped_and_one_line_flattens_newlines() -> None:
    evil = "a\x1b]0;t\x07b\tc\nd\r\x7f\x9b31m"
    assert safe.clean(evil) == "a\\x1b]0;t\\x07b\tc\nd\\x0d\\x7f\\x9b31m"
    assert safe.one_line(evil) == "a\\x1b]0;t\\x07b\tc d\\x0d\\x7f\\x9b31m"
    assert safe.is_one_line("plain text\twith a tab, é ✓")
    assert not safe.is_one_line("two\nlines")
    assert safe.text("[/x]").plain == "[/x]"  # Text: never parsed as markup
