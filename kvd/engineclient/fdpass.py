"""Engine side of the fd hand-over: give kvd a host pool as a file descriptor, not a name.

kvd maps only memory an engine hands over (SCM_RIGHTS on ``<socket>.fds``, see
:mod:`kvd.wire.fdmsg`), so it never opens a file with its own rights on an engine's behalf.
:func:`fd_memory` turns the memory map an engine has into the one kvd accepts:

- ``{"kind": "shm", "name": ..., "offsets": [...]}`` (a :class:`HostPool`, or a raw-pointer
  registration): the segment is opened here, with the engine's own rights, refusing symlinks;
- ``{"kind": "fd", "fd": <int>, "offsets": [...]}``: a descriptor the engine holds (a memfd);

and returns ``{"kind": "fd", "ticket": ..., "offsets": [...]}``. GPU maps pass through.
This module never sends a descriptor anywhere but kvd's own hand-over socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from kvd.wire import fdmsg

SHM_DIR = "/dev/shm"


class FdPassError(OSError):
    """The descriptor could not be handed over; the message says why."""


def hand_over(socket_path: str, fd: int, timeout: float = 10.0) -> str:
    """Send ``fd`` to the kvd serving ``socket_path``; the ticket to name in RegisterPool."""
    path = fdmsg.fd_socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise FdPassError(f"cannot reach kvd's fd hand-over socket {path}: {exc.strerror or exc} "
                              "(is the daemon new enough, and may this user open it?)") from None
        try:
            socket.send_fds(sock, [fdmsg.MAGIC], [fd])
            reply = sock.recv(fdmsg.MAX_REPLY)
        except OSError as exc:  # a timeout included: an engine catches one error type for this
            raise FdPassError(f"kvd's fd hand-over socket {path} did not take the descriptor: "
                              f"{exc.strerror or exc or type(exc).__name__}") from None
    finally:
        sock.close()
    status, value = fdmsg.parse_reply(reply)
    if status != "ok":
        raise FdPassError(f"kvd refused the pool descriptor: {value}")
    return value


def open_segment(name: str) -> int:
    """Open a /dev/shm segment by name as this process, never through a symlink."""
    if not name or "/" in name.strip("/") or name.strip("/") in (".", ".."):
        raise FdPassError(f"not a plain shared-memory segment name: {name!r}")
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FdPassError(f"cannot open shared-memory segment {path}: {exc.strerror}") from None


def fd_memory(socket_path: str, memory: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """The memory map kvd accepts for ``memory`` (see the module docstring); does the hand-over."""
    kind = memory.get("kind")
    if kind not in ("shm", "fd") or (kind == "fd" and "ticket" in memory):
        return memory
    owned = kind == "shm"
    fd = open_segment(str(memory.get("name", ""))) if owned else memory.get("fd")
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise FdPassError(f"an fd pool needs the descriptor as an int, got {fd!r}")
    try:
        ticket = hand_over(socket_path, fd, timeout)
    finally:
        if owned:
            with contextlib.suppress(OSError):
                os.close(fd)
    out = {k: v for k, v in memory.items() if k not in ("name", "fd")}
    return {**out, "kind": "fd", "ticket": ticket}


__all__ = ["FdPassError", "fd_memory", "hand_over", "open_segment"]
