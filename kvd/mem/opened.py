"""What an opened engine pool is: its buffers and regions in this process, and the errors of
opening one. Shared by the openers (:mod:`kvd.mem.memory`, :mod:`kvd.mem.fdpool`); no I/O
beyond the background prefault."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from dataclasses import dataclass, field
from typing import Any


class PoolMemoryError(ValueError):
    """Pool memory that cannot be opened or does not match its layout."""


@dataclass
class OpenedPool:
    """Buffers of one pool as addresses in this process, and the regions that hold them."""

    buffers: list[int]
    regions: list[tuple[int, int]]
    #: (device, inode) of the file mapped (a host pool handed over as a descriptor), else None:
    #: two pools with one identity are two mappings of the same pages.
    identity: tuple[int, int] | None = None
    _keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def backing(self) -> tuple[Any, ...]:
        """What holds the memory: the shared-memory mapping, or one CUDA tensor per buffer."""
        return tuple(self._keep)

    def close(self) -> None:
        for obj in self._keep:
            close = getattr(obj, "close", None)
            if close is not None:
                # A view still exported: the mapping then goes with the process.
                with contextlib.suppress(BufferError, ValueError):
                    close()
        self._keep.clear()


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def prefault(addr: int, length: int) -> threading.Thread:
    """Map every page of ``[addr, addr+length)`` writable, in a background thread (see
    :func:`prefault_ranges`)."""
    return prefault_ranges([(addr, length)])


def prefault_ranges(ranges: list[tuple[int, int]]) -> threading.Thread:
    """Map every page of each ``(addr, length)`` range writable, in a background thread.

    A page fault costs microseconds, and a 64 MiB chunk touches 16k pages: faulting them one at
    a time mid-transfer cost 90% of a staged transfer on a host pool. MADV_POPULATE_WRITE maps
    pages without changing a byte, so it is safe while the memory is in use, and the thread
    keeps registration from waiting (~0.6 s per GiB). On kernels without it, pages fault lazily.
    """

    def populate() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            for addr, length in ranges:
                start = addr & ~(mmap.PAGESIZE - 1)  # madvise wants a page-aligned start
                libc.madvise(start, addr + length - start, _MADV_POPULATE_WRITE)

    thread = threading.Thread(target=populate, name="kvd-prefault", daemon=True)
    thread.start()
    return thread


__all__ = ["OpenedPool", "PoolMemoryError", "prefault", "prefault_ranges"]
