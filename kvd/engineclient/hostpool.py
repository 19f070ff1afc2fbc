"""Host KV pools in POSIX shared memory, for engines (and fake engines) without a GPU pool.

An engine rank allocates one shared-memory segment holding every buffer of its pool back to
back and hands kvd the segment's name and buffer offsets (``HostPool.memory``); kvd maps the
same pages and registers them with the transfer engine, so writes land straight in the
engine's memory. Buffers start on 4096-byte boundaries so that each can be registered and
addressed page-aligned. This module never talks to the daemon.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from multiprocessing import shared_memory
from types import TracebackType
from typing import Any

import numpy as np

from kvd.core.layout import PoolLayout

ALIGN = 4096


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def _safe_name(text: str) -> str:
    # POSIX shm names may not contain "/" and should stay short and shell-friendly.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:48]


class HostPool:
    """One rank's KV pool in a shared-memory segment; buffer ``i`` is ``[tokens][heads][head bytes]``.

    The creator owns the segment: ``close()`` also unlinks it, so a finished engine leaves no
    file in /dev/shm behind (the daemon keeps its own mapping as long as it needs it).
    """

    def __init__(self, layout: PoolLayout, shm: shared_memory.SharedMemory, offsets: list[int],
                 owner: bool) -> None:
        self.layout = layout
        self._shm: shared_memory.SharedMemory | None = shm
        self.offsets = offsets
        self.size = shm.size
        self.name = shm.name
        self._owner = owner
        self._unlinked = False
        # One array over the whole segment; buffer views are slices of it, so close() has a
        # single export to drop before the mapping can be released.
        buf = shm.buf
        assert buf is not None, "an open segment has a buffer"
        self._array: np.ndarray | None = np.frombuffer(buf, dtype=np.uint8)

    @classmethod
    def create(cls, layout: PoolLayout, name: str | None = None) -> HostPool:
        """Allocate a zeroed segment big enough for every buffer of ``layout``."""
        stride = _round_up(layout.buffer_bytes)
        offsets = [i * stride for i in range(layout.num_buffers)]
        total = stride * layout.num_buffers
        if name is None:
            name = f"kvd-{_safe_name(layout.engine_id)}-{layout.tp_rank}-{uuid.uuid4().hex[:12]}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=total)
        return cls(layout, shm, offsets, owner=True)

    @property
    def memory(self) -> dict[str, Any]:
        """The RegisterPool ``memory`` map that tells kvd where this pool lives."""
        return {"kind": "shm", "name": self.name, "size": self.size, "offsets": list(self.offsets)}

    def buffer(self, i: int) -> np.ndarray:
        """uint8 view of buffer ``i`` shaped ``[num_tokens, local_heads, head_bytes]``."""
        if self._array is None:
            raise ValueError(f"host pool {self.name} is closed")
        if not 0 <= i < self.layout.num_buffers:
            raise IndexError(f"buffer {i} outside [0, {self.layout.num_buffers})")
        lay = self.layout
        start = self.offsets[i]
        flat = self._array[start:start + lay.buffer_bytes]
        return flat.reshape(lay.num_tokens, lay.local_heads, lay.head_bytes)

    def buffers(self) -> list[np.ndarray]:
        return [self.buffer(i) for i in range(self.layout.num_buffers)]

    def fill(self, value: int) -> None:
        """Set every byte of the segment (padding included) to ``value``."""
        if self._array is None:
            raise ValueError(f"host pool {self.name} is closed")
        self._array[:] = value

    def unlink(self) -> None:
        """Remove the segment's name; existing mappings (the daemon's) stay valid."""
        if self._shm is not None and not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()

    def close(self) -> None:
        """Unmap the segment, and unlink it too when this process created it."""
        if self._shm is None:
            return
        if self._owner:
            self.unlink()
        self._array = None
        shm, self._shm = self._shm, None
        # A caller may still hold a buffer view; the mapping then goes when the last view does.
        with contextlib.suppress(BufferError):
            shm.close()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostPool({self.name!r}, {self.size} bytes, {self.layout.num_buffers} buffers)"


__all__ = ["ALIGN", "HostPool"]
