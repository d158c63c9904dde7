"""Encode and decode messages, turning every malformed input into a TqError with a stable code."""

from __future__ import annotations

from typing import Any

import msgspec

from tq.errors import BadRequest, ProtocolError, UnknownMessage
from tq.protocol.framing import encode_frame
from tq.protocol.messages import Request, Response

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_response_decoder: msgspec.msgpack.Decoder[Response] = msgspec.msgpack.Decoder(Response)


def encode(msg: Any) -> bytes:
    """One message as a complete frame (length prefix included)."""
    return encode_frame(_encoder.encode(msg))


def encode_body(msg: Any) -> bytes:
    return _encoder.encode(msg)


def guess_rid(body: bytes) -> int:
    """Best effort: the request id of a message we could not decode, so the NACK can name it."""
    try:
        raw = msgspec.msgpack.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: msgspec's answer to deeply nested arrays, even in fields a typed
        # decoder would skip; it is called while handling a bad frame, so it must not raise
        return 0
    if isinstance(raw, list) and len(raw) > 1 and type(raw[1]) is int:  # not a bool
        return raw[1] if 0 <= raw[1] < 2**63 else 0
    return 0


def decode_request(body: bytes) -> Request:
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "`$[0]`" in text or "tag" in text.lower():
            raise UnknownMessage(f"unknown message type: {text}") from None
        raise BadRequest(f"malformed message: {text}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec reports bad UTF-8 in a string as UnicodeDecodeError, not DecodeError.
        raise ProtocolError(f"frame is not a msgpack message: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed message: nested too deeply") from None


def decode_response(body: bytes) -> Response:
    try:
        return _response_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad response from broker: {exc}") from None
