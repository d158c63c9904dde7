"""``validate_specs`` (a batch checked field by field, the fast path) must accept and refuse
exactly what ``validate_spec`` (one spec at a time, the definition) does, and name the first bad
task of a refused batch."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tq.broker.tcp import (
    MAX_BACKOFF_S,
    MAX_ID_LEN,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    validate_spec,
    validate_specs,
)
from tq.errors import TqError
from tq.model import MAX_PAYLOAD_BYTES
from tq.protocol.messages import TaskSpec

_ID_CHARS = "abcXYZ019_.:-"

_valid = st.builds(
    TaskSpec,
    id=st.text(_ID_CHARS, min_size=1, max_size=MAX_ID_LEN),
    name=st.sampled_from(["echo", "a.b:c-d_e"]),
    payload=st.sampled_from([b"", b"{}"]),
    queue=st.sampled_from(["default", "q-1"]),
    priority=st.integers(0, 2),
    max_retries=st.sampled_from([0, 3, MAX_RETRIES]),
    timeout_s=st.floats(min_value=0.001, max_value=MAX_TIMEOUT_S),
    backoff_s=st.floats(min_value=0.0, max_value=MAX_BACKOFF_S),
)

# One field of one spec set to a value at or just past a limit (some of them still valid).
_EDGES: dict[str, list[object]] = {
    "id": ["", "a" * MAX_ID_LEN, "a" * (MAX_ID_LEN + 1), "a b", "é", "a/b", "ok-id"],
    "name": ["", "x" * 200, "x" * 201, "a b", "ü"],
    "queue": ["", "q" * 201, "q q"],
    "priority": [-1, 3, 2, 0],
    "max_retries": [-1, MAX_RETRIES, MAX_RETRIES + 1],
    "timeout_s": [
        0.0,
        -1.0,
        MAX_TIMEOUT_S,
        math.nextafter(MAX_TIMEOUT_S, math.inf),
        math.nan,
        math.inf,
    ],
    "backoff_s": [0.0, -0.5, MAX_BACKOFF_S, MAX_BACKOFF_S + 1, math.nan, -math.inf],
}


@st.composite
def _batches(draw: st.DrawFn) -> list[TaskSpec]:
    specs = draw(st.lists(_valid, min_size=1, max_size=5))
    for _ in range(draw(st.integers(0, 2))):  # 0: an all-valid batch
        i = draw(st.integers(0, len(specs) - 1))
        field = draw(st.sampled_from(sorted(_EDGES)))
        value = draw(st.sampled_from(_EDGES[field]))
        specs[i] = msgspec.structs.replace(specs[i], **{field: value})
    return specs


def _first_bad(specs: list[TaskSpec]) -> tuple[int, TqError] | None:
    for i, spec in enumerate(specs):
        try:
            validate_spec(spec)
        except TqError as exc:
            return i, exc
    return None


@settings(max_examples=600)  # each example is microseconds; the edges need many draws
@given(_batches())
def test_the_batch_check_agrees_with_the_spec_by_spec_definition(specs: list[TaskSpec]) -> None:
    expected = _first_bad(specs)
    if expected is None:
        validate_specs(specs)  # must not raise
        return
    i, first = expected
    with pytest.raises(type(first)) as caught:
        validate_specs(specs)
    assert caught.value.message == f"task {i}: {first.message}"


def test_an_oversized_payload_is_refused_in_a_batch() -> None:
    good = TaskSpec("a", "echo", b"{}")
    big = TaskSpec("b", "echo", b"x" * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(TqError) as caught:
        validate_specs([good, big])
    assert caught.value.code == "PAYLOAD_TOO_LARGE"
    assert caught.value.message.startswith("task 1:")
