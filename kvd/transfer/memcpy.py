"""An in-process transport: one-sided writes as ``ctypes.memmove`` between registered regions.

For tests of the room sides without Mooncake or a second process. Several
:class:`MemcpyTransport` objects that share a :class:`MemcpyFabric` play the daemons of a
cluster: a write names the peer by its ``session_id``, reads from a region registered with
the writing transport and lands in a region registered with the peer's, exactly as a
Mooncake write would. Any op whose source or destination is not wholly inside one
registered region is refused with :class:`TransportError` before a single byte moves, so
a planner bug surfaces as a failed batch, never as a stray write into this process.

Tests may also hold writes (``hold()`` / ``release()``) to order them against other
events, and make the next batches fail (``fail_next``), as a dead peer or a NIC error would.
"""

from __future__ import annotations

import asyncio
import ctypes
import time

import numpy as np

from kvd.transfer.base import BatchResult, Transport, TransportError

__all__ = ["MemcpyFabric", "MemcpyTransport"]


class MemcpyFabric:
    """The transports of one process that can write into each other, by session id."""

    def __init__(self) -> None:
        self._members: dict[str, MemcpyTransport] = {}

    def join(self, transport: MemcpyTransport) -> None:
        if transport.session_id in self._members:
            raise TransportError(f"session {transport.session_id!r} is already on this fabric")
        self._members[transport.session_id] = transport

    def leave(self, transport: MemcpyTransport) -> None:
        if self._members.get(transport.session_id) is transport:
            del self._members[transport.session_id]

    def peer(self, session_id: str) -> MemcpyTransport:
        try:
            return self._members[session_id]
        except KeyError:
            raise TransportError(f"no transport with session {session_id!r} on this fabric") from None


class MemcpyTransport:
    """:class:`~kvd.transfer.base.Transport` by ``memmove`` inside this process.

    ``session_id`` names this transport on its ``fabric`` (a fabric of its own when none is
    given: it can then write only into its own regions). Writes run on the event loop
    thread, after one yield, so a write is a suspension point as a real one is.
    """

    protocol = "memcpy"
    devices = "-"

    def __init__(self, session_id: str = "memcpy-0", fabric: MemcpyFabric | None = None) -> None:
        self.session_id = session_id
        self.fabric = fabric if fabric is not None else MemcpyFabric()
        self._regions: dict[int, int] = {}
        self._closed = False
        self._gate = asyncio.Event()
        self._gate.set()
        self._fail: list[str] = []
        self.batches = 0
        self.bytes_written = 0
        self.fabric.join(self)

    # --- memory -----------------------------------------------------------------------------
    def register(self, addr: int, length: int) -> None:
        if self._closed:
            raise TransportError("register on a closed transport")
        if addr <= 0 or length <= 0:
            raise TransportError(f"cannot register {length} bytes at {addr:#x}")
        self._regions.setdefault(addr, length)

    def unregister(self, addr: int) -> None:
        self._regions.pop(addr, None)

    def regions(self) -> list[tuple[int, int]]:
        return sorted(self._regions.items())

    def contains(self, addr: int, length: int) -> bool:
        """Whether ``[addr, addr+length)`` lies wholly inside one registered region."""
        return any(base <= addr and addr + length <= base + size for base, size in self._regions.items())

    # --- test controls ----------------------------------------------------------------------
    def hold(self) -> None:
        """Writes started from now on wait (after their checks) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def fail_next(self, count: int = 1, reason: str = "injected failure") -> None:
        """The next ``count`` non-empty batches raise TransportError without writing."""
        self._fail.extend([reason] * count)

    # --- data -------------------------------------------------------------------------------
    def _check(self, peer: MemcpyTransport, src: list[int], dst: list[int], length: list[int]) -> None:
        if not len(src) == len(dst) == len(length):
            raise TransportError(f"batch of {len(src)} sources, {len(dst)} destinations, {len(length)} lengths")
        for i, (s, d, n) in enumerate(zip(src, dst, length, strict=True)):
            if n < 0:
                raise TransportError(f"op {i}: negative length {n}")
            if not self.contains(s, n):
                raise TransportError(f"op {i}: source [{s:#x}, +{n}) is outside the regions registered "
                                     f"with {self.session_id}")
            if not peer.contains(d, n):
                raise TransportError(f"op {i}: destination [{d:#x}, +{n}) is outside the regions registered "
                                     f"with {peer.session_id}")

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray,
                    length: np.ndarray) -> BatchResult:
        """Copy every op of the batch, or none: all ops are checked before the first byte moves."""
        if self._closed:
            raise TransportError(f"write to {peer_session} on a closed transport")
        if len(src) == 0:
            return BatchResult(0, 0, 0.0)
        srcs, dsts, lengths = (np.asarray(a, dtype=np.int64).tolist() for a in (src, dst, length))
        self._check(self.fabric.peer(peer_session), srcs, dsts, lengths)
        if self._fail:
            raise TransportError(f"write of {len(srcs)} ops to {peer_session} failed: {self._fail.pop(0)}")
        await self._gate.wait()
        await asyncio.sleep(0)
        # Checked again after the waits: the peer may have closed or unregistered meanwhile.
        if self._closed:
            raise TransportError(f"write to {peer_session} on a closed transport")
        self._check(self.fabric.peer(peer_session), srcs, dsts, lengths)
        t0 = time.perf_counter()
        for s, d, n in zip(srcs, dsts, lengths, strict=True):
            ctypes.memmove(d, s, n)
        seconds = time.perf_counter() - t0
        nbytes = sum(lengths)
        self.batches += 1
        self.bytes_written += nbytes
        return BatchResult(nbytes, len(srcs), seconds)

    def close(self) -> None:
        self._closed = True
        self._regions.clear()
        self.fabric.leave(self)
        self._gate.set()


def _conforms(transport: MemcpyTransport) -> Transport:  # checked by mypy: MemcpyTransport is a Transport
    return transport
