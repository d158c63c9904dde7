"""The wire protocol: 4-byte big-endian length + one msgspec-msgpack message per frame."""

from tq.protocol.framing import FrameDecoder, encode_frame
from tq.protocol.messages import PROTOCOL_VERSION, Request, Response

__all__ = ["PROTOCOL_VERSION", "FrameDecoder", "Request", "Response", "encode_frame"]
