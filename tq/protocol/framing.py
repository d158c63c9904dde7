"""Length-prefixed framing. Hand-written because it is twenty lines and sits on the hot path:
a stream buffer that yields whole frames and refuses a length over the limit before reading it."""

from __future__ import annotations

import struct
from typing import Final

from tq.errors import FrameTooLarge

_LEN: Final = struct.Struct(">I")
HEADER_BYTES: Final = 4


def encode_frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes in, get complete frame bodies out. Raises FrameTooLarge on an oversized header,
    so the caller can NACK and close without buffering the rest."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_BYTES:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self._limit:
                raise FrameTooLarge(f"frame of {size} bytes exceeds the {self._limit}-byte limit")
            if end - pos - HEADER_BYTES < size:
                break
            start = pos + HEADER_BYTES
            frames.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
