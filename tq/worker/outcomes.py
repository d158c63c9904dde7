"""Turning what a handler did into ``Outcome``s the broker will take.

Why a module of its own: everything a handler hands back is untrusted input to the worker. An
exception may be any ``BaseException``, its ``str()`` may raise, its message or traceback may be
megabytes; a result may be bigger than the broker's frame limit. Each of these once kept a task
``running`` forever, killed the worker, or made the worker resend a frame the broker refuses (and
lose its connection, and with it every lease it held) once a second. Here each becomes a failure
of that one task, and result batches are cut to fit the frame limit the broker announced.
"""

from __future__ import annotations

import traceback

from tq.model import MAX_PAYLOAD_BYTES, ErrorInfo
from tq.protocol.codec import encode_body
from tq.protocol.messages import Outcome

MAX_MESSAGE_CHARS = 8 * 1024  # an error message beyond this is cut (its head is kept)
MAX_TRACEBACK_CHARS = 64 * 1024  # a traceback beyond this is cut (its tail is kept: the raise)
ENVELOPE_BYTES = 1024  # room for a result batch's own fields around its outcomes
MAX_BATCH = 10_000  # outcomes per result batch (the broker's limit)


def describe(exc: BaseException) -> str:
    """``str(exc)``, or something readable when that raises or says nothing."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not turn one failed task into a stuck one
        try:
            text = repr(exc)
        except Exception:
            text = f"<unprintable {type(exc).__name__}>"
    return text


def _cut_head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _cut_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"[{len(text) - limit} chars cut] ..." + text[-limit:]


def failure(task_id: str, token: int, kind: str, message: str, trace: str = "") -> Outcome:
    """A failed attempt, with its message and traceback cut to a size worth storing."""
    return Outcome(
        task_id,
        token,
        False,
        error=ErrorInfo(
            kind[:200],
            _cut_head(message, MAX_MESSAGE_CHARS),
            _cut_tail(trace, MAX_TRACEBACK_CHARS),
        ),
    )


def from_exception(task_id: str, token: int, exc: BaseException) -> Outcome:
    """The handler raised ``exc``: its type, message and traceback (its first 20 frames)."""
    trace = "".join(traceback.format_exception(exc, limit=20))
    return failure(task_id, token, type(exc).__name__, describe(exc), trace)


def bound(outcome: Outcome) -> int:
    """At least the encoded size of ``outcome``, without encoding it: every result reported
    passes here, and encoding each one twice to measure it would cost the hot path. (A
    character takes at most 4 bytes of UTF-8; 64 bytes cover msgpack's headers and numbers.)"""
    n = 4 * len(outcome.task_id) + len(outcome.result or b"") + 64
    error = outcome.error
    if error is not None:
        n += 4 * (len(error.type) + len(error.message) + len(error.traceback))
    return n


def fit(outcome: Outcome, frame_limit: int) -> Outcome:
    """``outcome``, or a failure saying why it could not be reported, if it alone would not fit
    in a frame of ``frame_limit`` bytes, or its result is over the broker's limit for a result
    (``MAX_PAYLOAD_BYTES``, 10 MiB: the broker refuses a bigger one, whatever its frame limit)."""
    result = outcome.result
    if result is not None and len(result) > MAX_PAYLOAD_BYTES:
        return failure(
            outcome.task_id,
            outcome.token,
            "ResultTooLarge",
            f"the result is {len(result)} bytes, over the broker's limit of {MAX_PAYLOAD_BYTES} "
            "bytes for a result; store large results elsewhere and return a reference",
        )
    if bound(outcome) + ENVELOPE_BYTES <= frame_limit:
        return outcome
    size = len(encode_body(outcome))
    if size + ENVELOPE_BYTES <= frame_limit:
        return outcome
    if outcome.error is not None:
        # An error is worth reporting cut down: a quarter of the frame for its message and a
        # quarter for its traceback's tail (in characters, which UTF-8 makes up to 4 bytes).
        error = outcome.error
        room = max(256, (frame_limit - ENVELOPE_BYTES) // 16)
        smaller = failure(
            outcome.task_id,
            outcome.token,
            error.type,
            _cut_head(error.message, room),
            _cut_tail(error.traceback, room),
        )
        if len(encode_body(smaller)) + ENVELOPE_BYTES <= frame_limit:
            return smaller
    what = "result" if outcome.ok else "error report"
    return failure(
        outcome.task_id,
        outcome.token,
        "ResultTooLarge",
        f"the {what} is {size} bytes, over the broker's frame limit of {frame_limit} bytes "
        "(tq broker --max-frame); store large results elsewhere and return a reference",
    )


def prepare(outcomes: list[Outcome], frame_limit: int) -> list[list[Outcome]]:
    """``outcomes`` fitted and cut into batches that fit. The common case, everything fitting
    in one batch, costs one ``bound`` per outcome (a batch within ``MAX_PAYLOAD_BYTES`` in all
    holds no result over it either)."""
    if len(outcomes) <= MAX_BATCH:
        total = ENVELOPE_BYTES
        for outcome in outcomes:
            total += bound(outcome)
        if total <= frame_limit and total <= MAX_PAYLOAD_BYTES:
            return [outcomes]
    return batches([fit(o, frame_limit) for o in outcomes], frame_limit)


def batches(outcomes: list[Outcome], frame_limit: int) -> list[list[Outcome]]:
    """``outcomes`` (each already ``fit``) in batches that each fit in one frame."""
    out: list[list[Outcome]] = []
    current: list[Outcome] = []
    size = ENVELOPE_BYTES
    for outcome in outcomes:
        n = bound(outcome)
        if current and (size + n > frame_limit or len(current) >= MAX_BATCH):
            out.append(current)
            current, size = [], ENVELOPE_BYTES
        current.append(outcome)
        size += n
    if current:
        out.append(current)
    return out
