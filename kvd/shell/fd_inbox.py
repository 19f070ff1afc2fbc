"""The fd hand-over socket: engines pass their host pools to kvd as file descriptors.

asyncio streams read with ``recv`` and so drop ancillary data: a descriptor sent on the engine
socket would be closed by the kernel unseen. Descriptors therefore come over a second Unix
socket beside it (``<socket.path>.fds``, SOCK_SEQPACKET: one message = header + descriptor),
created with the same mode, group and allow-list as the engine socket. Each connection carries
one descriptor: kvd reads it with ``recvmsg`` (SCM_RIGHTS) on the raw socket, checks it, keeps
it under a fresh random ticket bound to the sender's uid (SO_PEERCRED) for a few seconds, and
answers ``OK <ticket>``. The engine then names the ticket in RegisterPool (see
:mod:`kvd.wire.fdmsg`); a ticket is redeemed once, by the same uid only.

This module never opens a path an engine names, never keeps a descriptor past its ticket, and
never lets one connection stall the others (short per-connection deadlines), nor one user's
connections every other user's (``MAX_INFLIGHT_PER_UID``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import os
import socket
import time
from collections.abc import Callable

import structlog

from kvd.mem.fdpool import check_fd
from kvd.mem.opened import PoolMemoryError
from kvd.shell.local_access import Credentials, LocalAccess, peer_credentials
from kvd.wire import fdmsg

log = structlog.get_logger("kvd.trust")

#: Seconds a hand-over connection may take to deliver its message.
RECV_TIMEOUT_S = 5.0
#: Hand-over connections served at once (more wait in the listen backlog).
MAX_INFLIGHT = 64
#: Of those, what one uid may hold (an engine hands over one descriptor per rank, in
#: milliseconds): past it a connection of that uid is refused at once, so one user's silent
#: connections cannot take every slot and the listen backlog, locking every other user's
#: engines out of pool registration.
MAX_INFLIGHT_PER_UID = 16


async def _readable(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(sock.fileno())


class FdInbox:
    """The hand-over socket's server; descriptors are kept by :class:`LocalAccess`."""

    def __init__(self, socket_path: str, mode: int, group: str, access: LocalAccess,
                 count: Callable[[str], None], now: Callable[[], float] = time.monotonic) -> None:
        self.path = fdmsg.fd_socket_path(socket_path)
        self.mode = mode
        self.group = group
        self.access = access
        self._count = count
        self._now = now
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self._per_uid: dict[int, int] = {}  # hand-overs in flight by uid
        self.received = 0

    async def start(self) -> None:
        from kvd.shell.engine_server import prepare_socket_path

        prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # never world-accessible, not even for a moment
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock

    async def serve(self) -> None:
        """Accept hand-overs until cancelled (the daemon's TaskOwner runs this)."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            creds = peer_credentials(conn)
            held = self._per_uid.get(creds.uid, 0)
            if held >= MAX_INFLIGHT_PER_UID:
                # Refused before it takes a slot or waits for anything: the accept loop goes on at
                # once, and the backlog drains, whatever one user keeps open.
                self._count("fd_handover_busy")
                log.warning("pool_fd_refused", peer_pid=creds.pid, peer_uid=creds.uid,
                            error=f"uid {creds.uid} has {held} hand-overs in flight")
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(fdmsg.error_reply(f"busy: uid {creds.uid} has {held} descriptor hand-overs in "
                                                f"flight (most {MAX_INFLIGHT_PER_UID})"))
                conn.close()
                continue
            await self._slots.acquire()
            self._per_uid[creds.uid] = held + 1
            task = asyncio.create_task(self._serve_one(conn, creds), name="fd-handover")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, uid=creds.uid))

    def _done(self, task: asyncio.Task[None], uid: int) -> None:
        self._tasks.discard(task)
        self._slots.release()
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        if not task.cancelled() and task.exception() is not None:
            self._count("fd_handover_bug")
            log.error("fd_handover_bug", error=repr(task.exception()))

    async def _serve_one(self, conn: socket.socket, creds: Credentials) -> None:
        fds: list[int] = []
        reply = b""
        try:
            conn.setblocking(False)
            refused = self.access.refusal(creds)
            if refused:
                raise PoolMemoryError(refused)
            await _readable(conn, RECV_TIMEOUT_S)
            data, fds, flags, _ = socket.recv_fds(conn, 64, 4)
            if flags & socket.MSG_CTRUNC:
                raise PoolMemoryError("more descriptors than fit (send exactly one)")
            if data != fdmsg.MAGIC or len(fds) != 1:
                raise PoolMemoryError(f"expected {fdmsg.MAGIC!r} with exactly one descriptor, got "
                                      f"{data[:16]!r} with {len(fds)}")
            check_fd(fds[0])
            ticket = self.access.deposit(fds.pop(), creds, self._now())
            self.received += 1
            reply = fdmsg.ok_reply(ticket)
            log.info("pool_fd_received", peer_pid=creds.pid, peer_uid=creds.uid)
        except (PoolMemoryError, OSError, TimeoutError) as exc:
            self._count("fd_handover_refused")
            text = str(exc) or type(exc).__name__
            log.warning("pool_fd_refused", peer_pid=creds.pid, peer_uid=creds.uid, error=text[:200])
            reply = fdmsg.error_reply(text)
        finally:
            for fd in fds:  # anything not kept under a ticket
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(reply)
        conn.close()

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


__all__ = ["FdInbox", "MAX_INFLIGHT", "MAX_INFLIGHT_PER_UID", "RECV_TIMEOUT_S"]
