"""Stream framing: a 4-byte big-endian length before each encoded message (engine Unix socket).

Sans-IO, like h11's receive buffer: bytes in, whole payloads out. It never decodes a payload
(``codec`` does), and never touches a socket, asyncio, zmq or torch.
"""

from __future__ import annotations

import struct

from kvd.wire.codec import ProtocolError

MAX_FRAME_BYTES = 256 * 1024 * 1024
"""Largest payload accepted: bounds the memory one bad or hostile length prefix can claim."""

_LEN = struct.Struct(">I")


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message for a byte stream."""
    return _LEN.pack(len(payload)) + payload


class FrameBuffer:
    """Feed stream bytes in, take whole payloads out."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > _LEN.size:  # an oversized frame: keep its prefix only, never its bytes
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max:
                del self._buf[_LEN.size:]

    @property
    def pending(self) -> int:
        """Bytes of a frame that has started arriving (0: between frames)."""
        return len(self._buf)

    def has_frame(self) -> bool:
        """Whether a whole frame (or an oversized prefix, which :meth:`next_payload` refuses) is in."""
        if len(self._buf) < _LEN.size:
            return False
        (size,) = _LEN.unpack_from(self._buf)
        return size > self._max or len(self._buf) >= _LEN.size + size

    def next_payload(self) -> bytes | None:
        """The next whole payload, or None until more bytes arrive; ProtocolError on a frame
        over the limit, raised as soon as its length prefix is in."""
        if len(self._buf) < _LEN.size:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if size > self._max:
            raise ProtocolError(f"frame of {size} bytes exceeds the {self._max}-byte limit")
        if len(self._buf) < _LEN.size + size:
            return None
        payload = bytes(self._buf[_LEN.size:_LEN.size + size])
        del self._buf[:_LEN.size + size]
        return payload


__all__ = ["MAX_FRAME_BYTES", "FrameBuffer", "frame"]
