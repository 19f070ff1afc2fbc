"""The library an inference engine links to talk to its node's kvd over the Unix socket.

:class:`KvdClient` (blocking) and :class:`AsyncKvdClient` (asyncio) have the same methods.
Each request gets exactly one reply with its ``req_id``; the daemon also pushes RoomEvents
(``req_id`` 0) when a room ends or is released. Both share :class:`kvd.replies.ReplyTracker` (no I/O):
replies -> results or exceptions, and a per-room stash of pushed events so ``wait()`` never
misses one that arrived while the client read some other reply. KV bytes are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from kvd.core.layout import PoolLayout
from kvd.engineclient.fdpass import FdPassError, fd_memory
from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import (  # noqa: F401 (re-exported: the client's public names)
    ERROR_CLASSES,
    FINAL_STATES,
    KvdBadRequest,
    KvdBusyError,
    KvdConnectionError,
    KvdError,
    KvdLayoutError,
    KvdProtocolError,
    KvdRegistrationError,
    KvdTimeout,
    KvdUnknownError,
    Pages,
    ReplyTracker,
    RoomFailed,
    RoomStatus,
    T,
    _pages,
    _UndecodableFrame,
    error_from_reply,
)
from kvd.wire import protocol as p
from kvd.wire.protocol import Message, ProtocolError

log = logging.getLogger("kvd.client")


def _conn_error(path: str, what: str, exc: BaseException | None = None) -> KvdConnectionError:
    return KvdConnectionError(f"kvd at {path}: {what}" + (f": {exc}" if exc else ""), kind="connection")


#: Chunks sent with ``wait=False`` whose replies may be outstanding before ``send`` reads some.
MAX_UNACKED = 256

_UNREACHABLE = "cannot connect (is the daemon running, and may this user open its socket?)"


# --- blocking client ---------------------------------------------------------------------------

class KvdClient:
    """Blocking client over the daemon's Unix socket; connects in the constructor.

    One client per engine rank: room ids, page offsets and pushed room events are per rank.
    ``timeout`` bounds each request's wait for its reply. One request runs at a time (a lock
    serialises threads); ``wait()`` holds the connection while it waits, so a thread that
    must send while another waits should use its own client or :class:`AsyncKvdClient`.
    """

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._t = ReplyTracker()
        self._frames = p.FrameBuffer()
        self._lock = threading.RLock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise _conn_error(socket_path, _UNREACHABLE, exc) from exc
        self._sock: socket.socket | None = sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> KvdClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _broken(self, what: str, exc: BaseException | None = None) -> KvdConnectionError:
        self.close()
        error = _conn_error(self.socket_path, what, exc)
        self._t.connection_lost(str(error))
        return error

    def _pump(self, deadline: float | None, what: str, req_id: int = -1) -> Message | None:
        """Read one message. Pushed events go to the stash (None is returned); so does a
        frame we cannot decode, unless it answers ``req_id``."""
        while True:
            try:
                payload = self._frames.next_payload()
            except ProtocolError as exc:  # a bad length prefix: the stream is out of step
                self.close()
                raise KvdProtocolError(f"bad frame from kvd: {exc}", kind="protocol") from exc
            if payload is not None:
                break
            if (sock := self._sock) is None:
                raise _conn_error(self.socket_path, "client is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                data = sock.recv(1 << 16)
            except TimeoutError:
                raise KvdTimeout(f"no {what} from kvd within the time limit", kind="timeout") from None
            except OSError as exc:
                raise self._broken("connection broke", exc) from exc
            if not data:
                raise self._broken("daemon closed the connection")
            self._frames.feed(data)
        try:
            msg = self._t.decode_frame(payload)
        except _UndecodableFrame as exc:
            if exc.req_id == req_id:
                raise
            if self._t.on_undecodable(exc):  # a chunk sent without waiting: its room fails
                return None
            log.warning("kvd client: skipped a message: %s", exc)
            return None
        if self._t.is_push(msg):
            self._t.on_push(msg)  # type: ignore[arg-type]
            return None
        if self._t.on_late_reply(msg):  # the reply to a chunk sent without waiting
            return None
        return msg

    def _send_frame(self, msg: Message) -> None:
        if self._sock is None:
            raise _conn_error(self.socket_path, "client is closed")
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(p.frame(p.encode(msg)))
        except OSError as exc:
            raise self._broken("cannot send", exc) from exc

    def _readable(self) -> bool:
        """Whether a whole frame is buffered, or bytes wait on the socket (no blocking)."""
        if self._frames.has_frame():
            return True
        if self._sock is None:
            return False
        return bool(select.select([self._sock], [], [], 0)[0])

    def _request(self, msg: Message, expected: type[T]) -> T:
        with self._lock:
            self._send_frame(msg)
            deadline = time.monotonic() + self.timeout
            req_id: int = msg.req_id  # type: ignore[attr-defined]
            what = f"reply to {type(msg).__name__} #{req_id}"
            while True:
                reply = self._pump(deadline, what, req_id)
                # Anything else is a late reply to a request that already timed out.
                if reply is not None and getattr(reply, "req_id", None) == req_id:
                    return self._t.result(reply, expected)

    def _wait_for(self, room: int, timeout: float | None, pick: Callable[[int], RoomStatus | None],
                  what: str) -> RoomStatus:
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while (status := pick(room)) is None:
                self._pump(deadline, f"{what} for room {room}")
            return status

    def register_pool(self, layout: PoolLayout, memory: dict[str, Any] | HostPool,
                      bootstrap: str = "") -> int:
        """Hand this rank's pool to kvd; returns the pool_id later calls name.

        ``memory`` is the pool's memory map (or a :class:`HostPool`); ``bootstrap`` is the
        directory daemon of a prefill engine ("" = this daemon). A host pool is handed to
        kvd as a file descriptor (:mod:`kvd.engineclient.fdpass`), never by name.
        """
        try:
            mem = fd_memory(self.socket_path, memory.memory if isinstance(memory, HostPool) else memory,
                            self.timeout)
        except FdPassError as exc:
            raise KvdRegistrationError(str(exc), kind="registration") from None
        return self._request(*self._t.register(layout, mem, bootstrap)).pool_id

    def send(self, pool_id: int, room: int, pages: Pages, is_last: bool, aux: bytes = b"", *,
             wait: bool = True) -> None:
        """Prefill: these pages of ``room`` are computed; ``aux`` rides with the last chunk.

        ``wait=False`` returns once the chunk is on the socket, without the daemon's round trip
        (a prefill engine's chunks then reach the daemon together and are planned as one
        burst); a chunk the daemon refuses then fails the room: ``wait()``/``pushed()`` report
        it with the daemon's reason. At most :data:`MAX_UNACKED` chunks go unanswered."""
        with self._lock:
            msg, expected = self._t.send(pool_id, room, pages, is_last, aux)
            if wait:
                self._request(msg, expected)
                return
            self._send_frame(msg)
            self._t.expect_later(msg)  # type: ignore[arg-type]
            # Take the replies already here; past the limit, wait for some (back-pressure).
            while self._t.unacked:
                if self._t.unacked < MAX_UNACKED and not self._readable():
                    break
                self._pump(time.monotonic() + self.timeout, "reply to a chunk sent without waiting")

    def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str,
             pages: Pages, timeout_s: float = 0.0, enable_hisparse: bool = False) -> None:
        """Decode: receive ``room`` into ``pages`` (HiSparse: token indices of a host pool).

        ``timeout_s`` 0 means the daemon's configured deadline.
        """
        with self._lock:
            self._request(*self._t.recv(pool_id, room, bootstrap_addr, prefill_engine_id, pages,
                                        timeout_s, enable_hisparse))

    def poll(self, room: int) -> RoomStatus:
        """The room's state now, asked of the daemon (every pool of this connection that began
        the room id: merged as ``wait`` merges their events)."""
        return self._t.merge_polls(room, {pool: RoomStatus.from_event(self._request(*self._t.poll(room, pool)))
                                          for pool in self._t.pools(room)})

    def wait(self, room: int, timeout: float | None = None) -> RoomStatus:
        """Block until the room succeeds (returned) or fails (RoomFailed); KvdTimeout after
        ``timeout`` seconds (None: no client-side limit, the daemon's deadlines still apply)."""
        return ReplyTracker.check_final(self._wait_for(room, timeout, self._t.final, "final state"))

    def wait_released(self, room: int, timeout: float | None = None) -> RoomStatus:
        """Block until no write can land in the room's pages any more (after abort or failure)."""
        return self._wait_for(room, timeout, self._t.released, "release")

    def abort(self, pool_id: int, room: int) -> None:
        """Ask kvd to abort the room; call wait_released() before reusing its pages."""
        self._request(*self._t.abort(pool_id, room))

    def status(self) -> dict[str, Any]:
        """The daemon's status snapshot (what kvctl status shows)."""
        return self._request(*self._t.status()).status

    def forget(self, room: int) -> None:
        """Drop the stashed events of a room the engine is finished with."""
        self._t.forget(room)

    def pushed(self, room: int) -> RoomStatus | None:
        """The latest event pushed for ``room`` that this client has read (no I/O)."""
        return self._t.pushed(room)


# --- asyncio client ----------------------------------------------------------------------------

class AsyncKvdClient:
    """asyncio client: one reader task resolves per-request futures and wakes room waiters.

    Use ``async with AsyncKvdClient(path) as c`` or ``await c.connect()``. Concurrent calls
    from many tasks are fine; ``timeout`` bounds each request's wait for its reply.
    """

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._t = ReplyTracker()
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._events = asyncio.Condition()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._error: KvdError | None = _conn_error(socket_path, "client is not connected")

    async def connect(self) -> AsyncKvdClient:
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), self.timeout)
        except (TimeoutError, OSError) as exc:
            raise _conn_error(self.socket_path, _UNREACHABLE, exc) from exc
        self._error = None
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="kvd-client-reader")
        return self

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        await self._fail_all(_conn_error(self.socket_path, "client is closed"))

    async def __aenter__(self) -> AsyncKvdClient:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        frames = p.FrameBuffer()
        try:
            while data := await reader.read(1 << 16):
                frames.feed(data)
                while (payload := frames.next_payload()) is not None:
                    await self._dispatch(payload)
            error: KvdError = _conn_error(self.socket_path, "daemon closed the connection")
        except ProtocolError as exc:  # a bad length prefix: the stream is out of step
            error = KvdProtocolError(f"bad frame from kvd: {exc}", kind="protocol")
        except OSError as exc:
            error = _conn_error(self.socket_path, "connection broke", exc)
        await self._fail_all(error)

    async def _dispatch(self, payload: bytes) -> None:
        try:
            msg = self._t.decode_frame(payload)
        except _UndecodableFrame as exc:
            if self._t.on_undecodable(exc):  # a chunk sent without waiting: its room fails
                async with self._events:
                    self._events.notify_all()
                return
            fut = self._pending.pop(exc.req_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            else:
                log.warning("kvd client: skipped a message: %s", exc)
            return
        if self._t.is_push(msg):
            async with self._events:
                self._t.on_push(msg)  # type: ignore[arg-type]
                self._events.notify_all()
            return
        if self._t.on_late_reply(msg):  # a chunk sent without waiting: a refusal fails its room
            async with self._events:
                self._events.notify_all()
            return
        fut = self._pending.pop(getattr(msg, "req_id", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _fail_all(self, error: KvdError) -> None:
        """The connection is gone: every pending request and room waiter gets ``error``."""
        self._error = self._error or error
        self._t.connection_lost(str(error))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        async with self._events:
            self._events.notify_all()

    async def _request(self, msg: Message, expected: type[T]) -> T:
        if self._writer is None or self._error is not None:
            raise self._error or _conn_error(self.socket_path, "client is closed")
        req_id: int = msg.req_id  # type: ignore[attr-defined]
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self._writer.write(p.frame(p.encode(msg)))
            await self._writer.drain()
            reply = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            raise KvdTimeout(f"no reply to {type(msg).__name__} #{req_id} from kvd within "
                             f"{self.timeout}s", kind="timeout") from None
        except OSError as exc:
            raise _conn_error(self.socket_path, "cannot send", exc) from exc
        finally:
            self._pending.pop(req_id, None)
        return self._t.result(reply, expected)

    async def _wait_for(self, room: int, timeout: float | None,
                        pick: Callable[[int], RoomStatus | None]) -> RoomStatus:
        async def until() -> RoomStatus:
            async with self._events:
                while (status := pick(room)) is None:
                    if self._error is not None:
                        raise self._error
                    await self._events.wait()
                return status

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise KvdTimeout(f"room {room}: no event from kvd within {timeout}s", kind="timeout",
                             room=room) from None

    async def register_pool(self, layout: PoolLayout, memory: dict[str, Any] | HostPool,
                            bootstrap: str = "") -> int:
        mem = memory.memory if isinstance(memory, HostPool) else memory
        if mem.get("kind") in ("shm", "fd"):  # the hand-over blocks (briefly): off the loop
            try:
                mem = await asyncio.get_running_loop().run_in_executor(
                    None, fd_memory, self.socket_path, mem, self.timeout)
            except FdPassError as exc:
                raise KvdRegistrationError(str(exc), kind="registration") from None
        return (await self._request(*self._t.register(layout, mem, bootstrap))).pool_id

    async def send(self, pool_id: int, room: int, pages: Pages, is_last: bool, aux: bytes = b"", *,
                   wait: bool = True) -> None:
        msg, expected = self._t.send(pool_id, room, pages, is_last, aux)
        if wait:
            await self._request(msg, expected)
            return
        if self._writer is None or self._error is not None:
            raise self._error or _conn_error(self.socket_path, "client is closed")
        self._t.expect_later(msg)  # type: ignore[arg-type]
        try:
            self._writer.write(p.frame(p.encode(msg)))
            await self._writer.drain()
        except OSError as exc:
            raise _conn_error(self.socket_path, "cannot send", exc) from exc

    async def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str,
                   pages: Pages, timeout_s: float = 0.0, enable_hisparse: bool = False) -> None:
        await self._request(*self._t.recv(pool_id, room, bootstrap_addr, prefill_engine_id, pages,
                                          timeout_s, enable_hisparse))

    async def poll(self, room: int) -> RoomStatus:
        return self._t.merge_polls(room, {pool: RoomStatus.from_event(await self._request(*self._t.poll(room, pool)))
                                          for pool in self._t.pools(room)})

    async def wait(self, room: int, timeout: float | None = None) -> RoomStatus:
        return ReplyTracker.check_final(await self._wait_for(room, timeout, self._t.final))

    async def wait_released(self, room: int, timeout: float | None = None) -> RoomStatus:
        return await self._wait_for(room, timeout, self._t.released)

    async def abort(self, pool_id: int, room: int) -> None:
        await self._request(*self._t.abort(pool_id, room))

    async def status(self) -> dict[str, Any]:
        return (await self._request(*self._t.status())).status

    def forget(self, room: int) -> None:
        self._t.forget(room)

    def pushed(self, room: int) -> RoomStatus | None:
        """The latest event the daemon pushed for ``room``, from the local stash (no I/O)."""
        return self._t.pushed(room)

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._error is None


for _name in ("register_pool", "send", "recv", "poll", "wait", "wait_released", "abort", "status", "forget"):
    getattr(AsyncKvdClient, _name).__doc__ = getattr(KvdClient, _name).__doc__  # one text for both

__all__ = [
    "AsyncKvdClient", "ERROR_CLASSES", "FINAL_STATES", "HostPool", "KvdBadRequest", "KvdBusyError",
    "KvdClient", "KvdConnectionError", "KvdError", "KvdLayoutError", "KvdProtocolError",
    "KvdRegistrationError", "KvdTimeout", "KvdUnknownError", "ReplyTracker", "RoomFailed",
    "RoomStatus", "error_from_reply",
]
