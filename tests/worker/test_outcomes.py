"""Outcomes the broker will take, whatever the handler produced (tq/worker/outcomes.py)."""

from __future__ import annotations

from tq.protocol.codec import encode_body
from tq.protocol.messages import Outcome
from tq.worker import outcomes


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


class BrokenBoth(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_describe_survives_a_broken_str_and_repr() -> None:
    assert outcomes.describe(ValueError("plain")) == "plain"
    assert outcomes.describe(BrokenStr()) == "BrokenStr()"
    assert outcomes.describe(BrokenBoth()) == "<unprintable BrokenBoth>"


def test_failure_cuts_a_huge_message_and_keeps_the_tail_of_a_huge_traceback() -> None:
    out = outcomes.failure("t", 1, "E", "m" * 100_000, "head" + "t" * 100_000 + "RAISED HERE")
    assert out.error is not None
    assert len(out.error.message) < outcomes.MAX_MESSAGE_CHARS + 50
    assert out.error.message.endswith("more chars]")
    assert out.error.traceback.endswith("RAISED HERE")
    assert len(out.error.traceback) < outcomes.MAX_TRACEBACK_CHARS + 50


def test_fit_keeps_what_fits_cuts_errors_and_refuses_big_results() -> None:
    small = Outcome("t", 1, True, result=b"1")
    assert outcomes.fit(small, 65_536) is small
    big = outcomes.fit(Outcome("t", 1, True, result=b"x" * 100_000), 65_536)
    assert not big.ok
    assert big.error is not None
    assert big.error.type == "ResultTooLarge"
    err = outcomes.failure("t", 1, "ValueError", "y" * 8_000, "z" * 60_000)
    cut = outcomes.fit(err, 65_536)
    assert cut.error is not None
    assert cut.error.type == "ValueError"  # still the real error, only shorter
    assert len(encode_body(cut)) + outcomes.ENVELOPE_BYTES <= 65_536


def test_batches_each_fit_in_a_frame_and_keep_the_order() -> None:
    items = [Outcome(f"t{i}", i, True, result=b"r" * 10_000) for i in range(20)]
    parts = outcomes.batches(items, 65_536)
    assert len(parts) > 1
    assert [o for part in parts for o in part] == items
    for part in parts:
        assert sum(len(encode_body(o)) for o in part) + outcomes.ENVELOPE_BYTES <= 65_536
    assert len(outcomes.batches([Outcome("t", 1, True)] * 25_000, 1 << 30)) == 3  # 10,000 each


def test_prepare_sends_what_fits_as_is_and_fits_the_rest() -> None:
    small = [Outcome(f"t{i}", i, True, result=b"1") for i in range(3)]
    assert outcomes.prepare(small, 65_536) == [small]
    mixed = [*small, Outcome("big", 9, True, result=b"x" * 100_000)]
    parts = outcomes.prepare(mixed, 65_536)
    flat = [o for part in parts for o in part]
    assert flat[:3] == small
    assert flat[3].error is not None
    assert flat[3].error.type == "ResultTooLarge"
