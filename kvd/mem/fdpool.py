"""Host pools handed over as file descriptors: memory as a capability, never as a name.

An engine opens (or creates: memfd, POSIX shm) its pool's memory with its own rights and
passes the descriptor over the Unix socket (SCM_RIGHTS). kvd maps what it was given and
nothing else: it never opens a path on an engine's behalf, so a local user cannot make the
daemon, which may run with more rights, read or write a file the user could not open
itself (the confused deputy). The descriptor must be a regular file on tmpfs or hugetlbfs
(memfd or /dev/shm), open for reading and writing, large enough for the layout; a memfd that
allows sealing is sealed against shrinking, so the engine cannot pull pages from under a
write in flight.

This module never opens a path, never follows a name, and never closes a descriptor it does
not own (a :class:`ReceivedFd` is owned by whoever holds it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import stat
from typing import Any

from kvd.core.layout import PoolLayout
from kvd.mem.opened import OpenedPool, PoolMemoryError, prefault_ranges

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_F_ADD_SEALS = 1033
_F_GET_SEALS = 1034
_F_SEAL_SEAL = 0x0001
_F_SEAL_SHRINK = 0x0002


class ReceivedFd:
    """A descriptor kvd received from an engine (SCM_RIGHTS), with the uid that sent it.

    Only the daemon makes these (never from a wire message); ``take()`` hands ownership on."""

    def __init__(self, fd: int, uid: int) -> None:
        self._fd: int | None = fd
        self.uid = uid

    def take(self) -> int:
        if self._fd is None:
            raise PoolMemoryError("this descriptor was used already")
        fd, self._fd = self._fd, None
        return fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file it opens: which memory it is (None once used or closed)."""
        if self._fd is None:
            return None
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    def __del__(self) -> None:  # a ticket nobody redeemed must not leak its descriptor
        with contextlib.suppress(OSError):
            self.close()


def filesystem_type(fd: int) -> int:
    """``f_type`` of ``fstatfs(fd)`` (Linux)."""
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise PoolMemoryError(f"fstatfs of the pool descriptor failed: {os.strerror(err)}")
    return int.from_bytes(buf.raw[:8], "little", signed=True) & 0xFFFFFFFF


def check_fd(fd: int) -> os.stat_result:
    """The checks every received descriptor passes (PoolMemoryError otherwise)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PoolMemoryError("the pool descriptor is not a regular file (memfd or /dev/shm segment expected)")
    kind = filesystem_type(fd)
    if kind not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
        raise PoolMemoryError(f"the pool descriptor is on a filesystem of type {kind:#x}, not tmpfs/hugetlbfs: "
                              "host pools must live in shared memory (memfd_create or /dev/shm)")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise PoolMemoryError("the pool descriptor must be open for reading and writing (O_RDWR)")
    return st


def _seal_shrink(fd: int) -> bool:
    """Seal a memfd against shrinking when it allows sealing; False when it does not."""
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
        if seals & _F_SEAL_SHRINK:
            return True
        if seals & _F_SEAL_SEAL:
            return False
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK)
        return True
    except OSError:  # not a memfd, or created without MFD_ALLOW_SEALING
        return False


def open_fd_pool(layout: PoolLayout, memory: dict[str, Any]) -> OpenedPool:
    """Map a received descriptor (``memory["fd"]``, a :class:`ReceivedFd`) and check every buffer
    lies inside it. The descriptor is closed here either way (the mapping keeps the memory)."""
    handle = memory.get("fd")
    if not isinstance(handle, ReceivedFd):
        raise PoolMemoryError("an fd pool needs a descriptor handed over on the fd socket (a ticket)")
    offsets = memory.get("offsets")
    if not isinstance(offsets, list) or len(offsets) != layout.num_buffers or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise PoolMemoryError(f"fd pool needs {layout.num_buffers} non-negative buffer offsets "
                              f"(layers x K/V), got {str(offsets)[:80]}")
    fd = handle.take()
    try:
        st = check_fd(fd)
        # Sealed first, measured after: an engine that shrinks its memfd between a size check
        # and the seal leaves kvd a mapping past the end of the file, and the first touch of it
        # (the prefault below, in the daemon) dies of SIGBUS.
        sealed = _seal_shrink(fd)
        size = os.fstat(fd).st_size
        end = max(offsets) + layout.buffer_bytes
        if size < end:
            raise PoolMemoryError(f"the pool descriptor has {size} bytes but the layout needs {end} "
                                  f"({layout.num_buffers} buffers of {layout.buffer_bytes})")
        ordered = sorted(offsets)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if b - a < layout.buffer_bytes:
                raise PoolMemoryError(f"buffers at offsets {a} and {b} overlap")
        # Only what the layout names is mapped and touched: a descriptor may be far larger than
        # the pool (a sparse memfd costs its engine nothing), and prefaulting all of it would
        # allocate every page in kvd's memory.
        try:
            mapping = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            # OSError: e.g. a memfd sealed against writes (F_SEAL_WRITE / F_SEAL_FUTURE_WRITE);
            # ValueError: mmap's own size check, when a file that cannot be sealed shrank meanwhile
            raise PoolMemoryError(f"the pool descriptor cannot be mapped shared for reading and writing: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
    finally:
        os.close(fd)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    prefault_ranges([(base + o, layout.buffer_bytes) for o in offsets])
    del sealed  # a /dev/shm segment cannot be sealed; a memfd with sealing now is
    return OpenedPool(buffers=[base + o for o in offsets], regions=[(base, end)], _keep=[mapping],
                      identity=(st.st_dev, st.st_ino))


__all__ = ["HUGETLBFS_MAGIC", "ReceivedFd", "TMPFS_MAGIC", "check_fd", "filesystem_type", "open_fd_pool"]
