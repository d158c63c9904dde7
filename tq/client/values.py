"""The values a task carries, payloads and results: JSON unless the caller passes bytes.

One owner for the encoding rules, so a producer's payload and a handler's result are refused for
the same reasons with the same words (the worker reports the latter as ``ResultNotSerializable``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from tq.errors import BadRequest

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

# msgpack's float64 (0xcb) whose exponent bits are all ones: NaN or an infinity. Text cannot hold
# it (0xcb starts a 2-byte UTF-8 sequence, which 0x7f and 0xff do not continue); bytes, integers,
# lengths or finite floats may, so a match is confirmed by the exact check.
_NON_FINITE = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")


def encode_payload(payload: Any) -> bytes:
    """JSON by default; bytes pass through untouched (the caller chose the encoding)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    try:
        out = _json_encode(payload)
    # UnicodeEncodeError: a lone surrogate; RecursionError: a container that holds itself (or
    # nesting deeper than the interpreter's recursion limit)
    except (TypeError, msgspec.EncodeError, UnicodeEncodeError, RecursionError) as exc:
        raise BadRequest(f"payload is not JSON-serializable: {exc}") from None
    # JSON has no NaN or infinity: msgspec writes them as null, so the handler would get (or the
    # producer would read back) null in place of the numbers, silently. Only a value whose JSON
    # holds null can hold one, so the rest pay for a bytes search and nothing more.
    if b"null" in out and non_finite(payload):
        raise BadRequest(
            "payload is not JSON-serializable: it holds NaN or infinity, which JSON cannot "
            "represent"
        )
    return out


def decode_value(raw: bytes | None) -> Any:
    """A payload or result as the handler saw it: decoded JSON, or the raw bytes if not JSON."""
    if raw is None:
        return None
    try:
        return _json_decode(raw)
    except msgspec.DecodeError:
        return raw


def non_finite(value: Any) -> bool:
    """Whether ``value``, whose JSON encoding holds ``null``, holds a NaN or an infinity.

    Only values whose msgpack encoding shows a non-finite float get the exact check: all of it C
    code, no Python walk of the value."""
    if isinstance(value, bytes | bytearray | memoryview):
        return False
    try:
        packed: bytes | None = msgspec.msgpack.encode(value)
    except Exception:  # e.g. an int msgpack cannot carry: let the exact check say
        packed = None
    if packed is not None and _NON_FINITE.search(packed) is None:
        return False
    try:
        json.dumps(msgspec.to_builtins(value, str_keys=True), allow_nan=False)
    except ValueError:  # json: "Out of range float values are not JSON compliant"
        return True
    except Exception:  # what msgspec encoded, the exact check could not: keep msgspec's answer
        return False
    return False
