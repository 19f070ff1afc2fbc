"""The library an inference engine links to talk to its node's kvd over the Unix socket.

:class:`KvdClient` (blocking) and :class:`AsyncKvdClient` (asyncio) have the same methods.
Each request gets exactly one reply with its ``req_id``; the daemon also pushes RoomEvents
(``req_id`` 0) when a room ends or is released. Both share :class:`ReplyTracker` (no I/O):
replies -> results or exceptions, and a per-room stash of pushed events so ``wait()`` never
misses one that arrived while the client read some other reply. KV bytes are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

import msgpack
import numpy as np

from kvd import protocol as p
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.protocol import ErrorReply, Message, ProtocolError, RoomEvent

log = logging.getLogger("kvd.client")

FINAL_STATES = ("success", "failed")
Pages = Sequence[int] | np.ndarray
T = TypeVar("T", bound=Message)


# --- exceptions ------------------------------------------------------------------------------

class KvdError(Exception):
    """Base of every kvd client error; ``kind`` is the daemon's error kind, ``room`` -1 if none."""

    def __init__(self, message: str, kind: str = "error", room: int = -1) -> None:
        super().__init__(message)
        self.kind = kind
        self.room = room


class KvdProtocolError(KvdError):
    """The daemon could not parse what we sent, or we could not parse its answer."""


class _UndecodableFrame(KvdProtocolError):
    """A whole frame arrived but is no message we know; ``req_id`` is our best guess (0: none)."""

    def __init__(self, message: str, req_id: int) -> None:
        super().__init__(message, kind="protocol")
        self.req_id = req_id


class KvdBadRequest(KvdError):
    """A request was well-formed but not acceptable (bad pages, bad state for the room...)."""


class KvdLayoutError(KvdError):
    """The pool layout is invalid or cannot be mapped onto the peer's."""


class KvdUnknownError(KvdError):
    """The daemon does not know the pool or room named in the request."""


class KvdRegistrationError(KvdError):
    """The pool's memory could not be opened or registered; the message says why and the fix."""


class KvdBusyError(KvdError):
    """The daemon refuses more work for now (back-pressure); retry later."""


class RoomFailed(KvdError):
    """A room ended in state "failed"; ``status`` holds the daemon's final event."""

    def __init__(self, status: RoomStatus) -> None:
        super().__init__(f"room {status.room} failed: {status.reason or 'no reason given'}",
                         kind="room_failed", room=status.room)
        self.status = status


class KvdTimeout(KvdError, TimeoutError):
    """No reply or event arrived within the caller's time limit."""


class KvdConnectionError(KvdError, ConnectionError):
    """The daemon's socket is unreachable or closed."""


ERROR_CLASSES: dict[str, type[KvdError]] = {
    "protocol": KvdProtocolError, "bad_request": KvdBadRequest, "layout": KvdLayoutError,
    "unknown_pool": KvdUnknownError, "unknown_room": KvdUnknownError,
    "registration": KvdRegistrationError, "busy": KvdBusyError,
}


def error_from_reply(reply: ErrorReply) -> KvdError:
    """Map a daemon ErrorReply to the exception class engines catch."""
    cls = ERROR_CLASSES.get(reply.kind, KvdError)
    where = f" (room {reply.room})" if reply.room >= 0 else ""
    return cls(f"kvd refused the request [{reply.kind}]{where}: {reply.message}",
               kind=reply.kind, room=reply.room)


@dataclass(frozen=True)
class RoomStatus:
    """A room's state as the daemon last reported it."""

    room: int
    state: str
    reason: str = ""
    aux: bytes = b""
    bytes_done: int = 0
    bytes_total: int = 0
    released: bool = False

    @property
    def done(self) -> bool:
        """True once the room reached a final state (success or failed)."""
        return self.state in FINAL_STATES

    @classmethod
    def from_event(cls, ev: RoomEvent) -> RoomStatus:
        return cls(room=ev.room, state=ev.state, reason=ev.reason, aux=ev.aux,
                   bytes_done=ev.bytes_done, bytes_total=ev.bytes_total, released=ev.released)


# --- shared, I/O-free reply handling -----------------------------------------------------------

class ReplyTracker:
    """Bookkeeping both clients share: request ids, reply checking and the pushed-event stash.

    The stash keeps, per room, the latest pushed event; a ``released`` flag once seen stays
    set, because a released room can never become unreleased. Released entries beyond
    ``max_released`` are forgotten oldest first, so a long-lived engine does not grow without
    bound; rooms still in flight are never forgotten.
    """

    def __init__(self, max_released: int = 4096) -> None:
        self._next_id = 0
        self._stash: dict[int, RoomStatus] = {}
        self._sending: set[int] = set()
        self._sent_pages: dict[int, int] = {}  # pages sent so far per prefill room in flight
        self.max_released = max_released

    def next_req_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def decode_frame(payload: bytes) -> Message:
        """Decode one frame, or raise _UndecodableFrame naming the request it likely answers:
        framing is intact, so only that request fails and the connection goes on."""
        try:
            return p.decode(payload)
        except ProtocolError as exc:
            items: Any = None
            with contextlib.suppress(Exception):  # garbage bytes: no request to blame
                items = msgpack.unpackb(payload, raw=False)
            # req_id is the first field of every engine message: [version, type, req_id, ...]
            ok = isinstance(items, list) and len(items) > 2 and type(items[2]) is int
            raise _UndecodableFrame(f"undecodable message from kvd: {exc}", items[2] if ok else 0) from None

    @staticmethod
    def is_push(msg: Message) -> bool:  # an unasked event
        return isinstance(msg, RoomEvent) and msg.req_id == 0

    def on_push(self, ev: RoomEvent) -> RoomStatus:
        """Stash a pushed event and return the room's merged status."""
        new = RoomStatus.from_event(ev)
        old = self._stash.pop(ev.room, None)
        if old is not None and old.released and not new.released:
            new = replace(new, released=True)
        self._stash[ev.room] = new  # re-insert: dict order is then oldest-first
        if len(self._stash) > 2 * self.max_released:
            released = [room for room, st in self._stash.items() if st.released]
            for room in released[:max(0, len(released) - self.max_released)]:
                del self._stash[room]
        return new

    @staticmethod
    def result(reply: Message, expected: type[T]) -> T:
        """The reply as ``expected``, or raise the exception an ErrorReply stands for."""
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply)
        if not isinstance(reply, expected):
            raise KvdProtocolError(f"expected {expected.__name__} from kvd, got {type(reply).__name__}",
                                   kind="protocol")
        return reply

    def start_room(self, room: int, is_last: bool = True, sending: bool = False) -> None:
        """A room id is (re)used: drop the previous use's events. Only a prefill room's first
        chunk does, so a failure pushed between chunks still reaches ``wait()``."""
        if not sending or room not in self._sending:
            self._stash.pop(room, None)
        if sending and not is_last:
            self._sending.add(room)
        else:
            self._sending.discard(room)

    def final(self, room: int) -> RoomStatus | None:
        """The room's final status if one was pushed, else None."""
        return st if (st := self._stash.get(room)) is not None and st.done else None

    def released(self, room: int) -> RoomStatus | None:
        return st if (st := self._stash.get(room)) is not None and st.released else None

    def forget(self, room: int) -> None:
        """Drop what is known of a room (the engine is done with it)."""
        self._stash.pop(room, None)
        self._sending.discard(room)

    @staticmethod
    def check_final(status: RoomStatus) -> RoomStatus:
        """Return a successful status, raise RoomFailed for a failed one."""
        if status.state == "failed":
            raise RoomFailed(status)
        return status

    # Request builders: each takes a fresh req_id and names the reply type it expects, so the
    # two clients differ only in how bytes move.
    def register(self, layout: PoolLayout, memory: dict[str, Any] | HostPool,
                 bootstrap: str) -> tuple[Message, type[p.PoolRegistered]]:
        mem = memory.memory if isinstance(memory, HostPool) else memory
        return p.RegisterPool(req_id=self.next_req_id(), layout=layout.to_dict(), memory=mem,
                              bootstrap=bootstrap), p.PoolRegistered

    def send(self, pool_id: int, room: int, pages: Pages, is_last: bool,
             aux: bytes) -> tuple[Message, type[p.Ok]]:
        arr = _pages(pages)
        offset = self._sent_pages.get(room, 0) if room in self._sending else 0
        msg = p.SendChunk(req_id=self.next_req_id(), pool_id=pool_id, room=room, pages=arr,
                          is_last=bool(is_last), aux=bytes(aux), page_offset=offset)
        self.start_room(room, is_last=is_last, sending=True)
        # The page offset tells kvd a late chunk of an ended room from a new room's first chunk.
        if is_last:
            self._sent_pages.pop(room, None)
        else:
            self._sent_pages[room] = offset + len(arr)
        return msg, p.Ok

    def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str, pages: Pages,
             timeout_s: float, enable_hisparse: bool) -> tuple[Message, type[p.Ok]]:
        msg = p.RecvRoom(req_id=self.next_req_id(), pool_id=pool_id, room=room,
                         bootstrap_addr=bootstrap_addr, prefill_engine_id=prefill_engine_id,
                         pages=_pages(pages), timeout_s=float(timeout_s),
                         enable_hisparse=bool(enable_hisparse))
        self.start_room(room)
        return msg, p.Ok

    def poll(self, room: int) -> tuple[Message, type[RoomEvent]]:
        return p.PollRoom(req_id=self.next_req_id(), room=room), RoomEvent

    def abort(self, pool_id: int, room: int) -> tuple[Message, type[p.Ok]]:
        return p.AbortRoom(req_id=self.next_req_id(), pool_id=pool_id, room=room), p.Ok

    def status(self) -> tuple[Message, type[p.StatusReply]]:
        return p.StatusRequest(req_id=self.next_req_id()), p.StatusReply


def _pages(pages: Pages) -> np.ndarray:
    """Page (or token) indices as a 1-D int64 array, refusing floats and nested lists."""
    arr = np.asarray(pages)
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise KvdBadRequest(f"pages must be a 1-D sequence of integers, got {arr.dtype} shape {arr.shape}",
                            kind="bad_request")
    return arr.astype(np.int64).reshape(-1)


def _conn_error(path: str, what: str, exc: BaseException | None = None) -> KvdConnectionError:
    return KvdConnectionError(f"kvd at {path}: {what}" + (f": {exc}" if exc else ""), kind="connection")


_UNREACHABLE = "cannot connect (is the daemon running, and may this user open its socket?)"


# --- blocking client ---------------------------------------------------------------------------

class KvdClient:
    """Blocking client over the daemon's Unix socket; connects in the constructor.

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
        return _conn_error(self.socket_path, what, exc)

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
            log.warning("kvd client: skipped a message: %s", exc)
            return None
        if self._t.is_push(msg):
            self._t.on_push(msg)  # type: ignore[arg-type]
            return None
        return msg

    def _request(self, msg: Message, expected: type[T]) -> T:
        with self._lock:
            if self._sock is None:
                raise _conn_error(self.socket_path, "client is closed")
            try:
                self._sock.settimeout(self.timeout)
                self._sock.sendall(p.frame(p.encode(msg)))
            except OSError as exc:
                raise self._broken("cannot send", exc) from exc
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
        directory daemon of a prefill engine ("" = this daemon).
        """
        return self._request(*self._t.register(layout, memory, bootstrap)).pool_id

    def send(self, pool_id: int, room: int, pages: Pages, is_last: bool, aux: bytes = b"") -> None:
        """Prefill: these pages of ``room`` are computed; ``aux`` rides with the last chunk."""
        with self._lock:
            self._request(*self._t.send(pool_id, room, pages, is_last, aux))

    def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str,
             pages: Pages, timeout_s: float = 0.0, enable_hisparse: bool = False) -> None:
        """Decode: receive ``room`` into ``pages`` (HiSparse: token indices of a host pool).

        ``timeout_s`` 0 means the daemon's configured deadline.
        """
        with self._lock:
            self._request(*self._t.recv(pool_id, room, bootstrap_addr, prefill_engine_id, pages,
                                        timeout_s, enable_hisparse))

    def poll(self, room: int) -> RoomStatus:
        """The room's state now, asked of the daemon."""
        return RoomStatus.from_event(self._request(*self._t.poll(room)))

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
        fut = self._pending.pop(getattr(msg, "req_id", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _fail_all(self, error: KvdError) -> None:
        """The connection is gone: every pending request and room waiter gets ``error``."""
        self._error = self._error or error
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
        return (await self._request(*self._t.register(layout, memory, bootstrap))).pool_id

    async def send(self, pool_id: int, room: int, pages: Pages, is_last: bool, aux: bytes = b"") -> None:
        await self._request(*self._t.send(pool_id, room, pages, is_last, aux))

    async def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str,
                   pages: Pages, timeout_s: float = 0.0, enable_hisparse: bool = False) -> None:
        await self._request(*self._t.recv(pool_id, room, bootstrap_addr, prefill_engine_id, pages,
                                          timeout_s, enable_hisparse))

    async def poll(self, room: int) -> RoomStatus:
        return RoomStatus.from_event(await self._request(*self._t.poll(room)))

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


for _name in ("register_pool", "send", "recv", "poll", "wait", "wait_released", "abort", "status", "forget"):
    getattr(AsyncKvdClient, _name).__doc__ = getattr(KvdClient, _name).__doc__  # one text for both

__all__ = [
    "AsyncKvdClient", "ERROR_CLASSES", "FINAL_STATES", "HostPool", "KvdBadRequest", "KvdBusyError",
    "KvdClient", "KvdConnectionError", "KvdError", "KvdLayoutError", "KvdProtocolError",
    "KvdRegistrationError", "KvdTimeout", "KvdUnknownError", "ReplyTracker", "RoomFailed",
    "RoomStatus", "error_from_reply",
]
