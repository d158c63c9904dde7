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
    """Feed bytes in, get complete frame bodies out. An oversized header raises FrameTooLarge so
    the caller can NACK and close without buffering the rest; frames that arrived complete before
    it in the same read are returned first, and the error is raised by the next ``feed``."""

    __slots__ = ("_buf", "_error", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._error: FrameTooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_BYTES:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self._limit:
                self._error = FrameTooLarge(
                    f"frame of {size} bytes exceeds the {self._limit}-byte limit"
                )
                buf.clear()
                if not frames:
                    raise self._error
                return frames
            if end - pos - HEADER_BYTES < size:
                break
            start = pos + HEADER_BYTES
            frames.append(bytes(buf[start : start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def failed(self) -> bool:
        """An oversized frame was seen: the stream cannot be resynchronised."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        return len(self._buf)
