"""The local API: engines talk to kvd over a Unix socket, one coroutine per connection.

The socket is created with an explicit mode (0660 by default, never world-writable),
its directory is created, a stale socket left by a dead daemon is replaced but a
live one is not, and every connection's peer uid/gid/pid (SO_PEERCRED) is logged.
Each request gets exactly one reply with its req_id; bad input gets an ErrorReply
and a counter, and the connection and the daemon carry on.

Bounded: a request longer than ``socket.max_frame_bytes`` is refused as soon as its length
prefix arrives (nothing of it is buffered) and the connection is closed; a request that
started arriving must arrive in full within ``socket.frame_timeout_s``; a connection that
holds no pool and stays silent for ``socket.idle_timeout_s`` is closed; at
``socket.max_connections`` the longest-idle connection without a pool makes room (none:
the newcomer gets a ``busy`` error), and so on per uid at ``socket.max_connections_per_uid``
(one user cannot take every slot; only its own connections make room for it); requests over ``socket.offload_bytes`` are decoded off
the event loop. The shape of every request is checked here, before the daemon sees it.
This module never decides what a request does and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from kvd.core.config import Config
from kvd.core.layout import LayoutError
from kvd.core.planner import PlanError
from kvd.core.rooms import RoomError, TooManyRooms
from kvd.mem.memory import PoolMemoryError
from kvd.shell.local_access import Credentials, LocalAccess
from kvd.shell.peer_hub import PeerAddressError, check_peer_address
from kvd.transfer.base import TransportError
from kvd.wire.codec import Message, ProtocolError, decode
from kvd.wire.engine import ENGINE_REQUESTS, ErrorReply, PoolRegistered, RecvRoom, RegisterPool, request_id
from kvd.wire.framing import FrameBuffer, frame

log = structlog.get_logger("kvd.engine_api")


class RequestError(Exception):
    """A request the daemon refuses; kind is what the client maps to an exception class."""

    def __init__(self, kind: str, message: str, room: int = -1) -> None:
        super().__init__(message)
        self.kind = kind
        self.room = room


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def prepare_socket_path(path: str) -> None:
    """Create the directory; remove a stale socket, refuse to steal a live one or a non-socket."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise OSError(f"another kvd is already serving {path}")


class EngineHandler(Protocol):
    """What the server calls: the daemon's request routing and its reaction to a closed connection."""

    def on_engine_request(self, conn_id: int, msg: Message) -> Message | Awaitable[Message]:
        """The reply, or an awaitable of it for a request whose work blocks (a pool's
        registration runs on a worker thread): the connection waits for it, the loop does not."""
    def engine_gone(self, conn_id: int) -> None: ...
    def count_error(self, kind: str) -> None: ...


#: Longest engine_id / bootstrap address accepted (they become log fields and map keys).
MAX_NAME = 256
#: Seconds one connection's requests may hold the event loop before it lets the others run.
YIELD_S = 0.005
#: How often a request still being worked on (a pool's registration) looks whether its engine left.
GONE_POLL_S = 0.05


def check_request(msg: Message) -> None:
    """The shape of a request, checked before the daemon acts on it (RequestError if wrong): a
    non-string engine_id or an address kvd cannot connect to is the engine's mistake, never an
    internal error halfway through a registration."""
    if isinstance(msg, RegisterPool):
        layout: Any = msg.layout
        engine = layout.get("engine_id") if isinstance(layout, dict) else None
        if not isinstance(engine, str) or not engine or len(engine) > MAX_NAME:
            raise RequestError("layout", f"layout.engine_id must be a non-empty string of at most {MAX_NAME} "
                                         f"characters, got {str(engine)[:80]!r}")
        for name in ("tp_rank", "tp_size"):
            value = layout.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError("layout", f"layout.{name} must be an integer, got {str(value)[:80]!r}")
        if msg.bootstrap:
            _address(msg.bootstrap, "bootstrap")
    elif isinstance(msg, RecvRoom):
        _address(msg.bootstrap_addr, "bootstrap_addr")
        if not msg.prefill_engine_id or len(msg.prefill_engine_id) > MAX_NAME:
            raise RequestError("bad_request", f"prefill_engine_id must be a non-empty string of at most "
                                              f"{MAX_NAME} characters", msg.room)


def _address(addr: str, what: str) -> None:
    try:
        check_peer_address(addr)
    except PeerAddressError as exc:
        raise RequestError("bad_request", f"{what}: {exc}") from None


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    last_active: float
    uid: int = -1  # SO_PEERCRED's (-1: the kernel said nothing)
    pooled: bool = False  # it registered a pool: an engine, kept however quiet it is
    # Frames (replies and pushed events, in order) written together once per loop pass: one
    # send() for a burst of room events instead of one each (issue 15).
    out: list[bytes] = field(default_factory=list)
    out_bytes: int = 0  # of ``out``

    def queue(self, data: bytes) -> None:
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(data)
        self.out_bytes += len(data)

    def unread(self) -> int:
        """Bytes of replies and events the engine has not read yet (queued or buffered)."""
        return self.out_bytes + self.writer.transport.get_write_buffer_size()

    def flush(self) -> None:
        if self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.out_bytes = 0
            if not self.writer.is_closing():
                self.writer.write(data)


class EngineServer:
    def __init__(self, config: Config, handler: EngineHandler) -> None:
        self.config = config
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        #: Who may connect and who owns what (kvd.shell.local_access); the daemon sets it.
        self.access: LocalAccess | None = None

    async def start(self) -> None:
        c = self.config
        prepare_socket_path(c.socket_path)
        old = os.umask(0o177)  # the socket never exists world-accessible, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=c.socket_path,
                                                           limit=1 << 20, backlog=c.socket_backlog)
        finally:
            os.umask(old)
        os.chmod(c.socket_path, c.socket_mode)
        if c.socket_group:
            os.chown(c.socket_path, -1, grp.getgrnam(c.socket_group).gr_gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self._conns.values():
            conn.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket_path)

    def push(self, conn_id: int, msg: Message) -> None:
        conn = self._conns.get(conn_id)
        if conn is not None and not conn.writer.is_closing():
            conn.queue(self._encoded(msg))

    def _encoded(self, msg: Message) -> bytes:
        """A framed message; one that cannot be encoded (a number past 64 bits from a broken
        peer, say) costs that one reply, answered as an internal error, never the connection."""
        try:
            return frame(msg.encode())
        except (OverflowError, ValueError, TypeError) as exc:
            self.handler.count_error("internal")
            log.error("engine_reply_unencodable", msg=type(msg).__name__, error=f"{type(exc).__name__}: {exc}")
            return frame(ErrorReply(req_id=getattr(msg, "req_id", 0), kind="internal",
                                    message=f"kvd could not encode its {type(msg).__name__}: {exc}").encode())

    def connections(self) -> int:
        return len(self._conns)

    def _make_room(self, uid: int | None = None) -> bool:
        """At a connection limit: close the longest-idle connection without a pool (of ``uid``
        only, at that uid's limit)."""
        idle = [(c.last_active, k) for k, c in self._conns.items()
                if not c.pooled and (uid is None or c.uid == uid)]
        if not idle:
            return False
        _, victim = min(idle)
        self.handler.count_error("engine_conn_evicted")
        log.warning("engine_connection_evicted", conn=victim,
                    reason="max_connections" if uid is None else "max_connections_per_uid")
        self._conns[victim].writer.close()
        return True

    def _timeout(self, conn: _Conn, frames: FrameBuffer, frame_started: float) -> float | None:
        """Seconds the next read may wait: what is left of the started frame's time (a frame must
        arrive whole within ``socket.frame_timeout_s`` of its first byte, however its bytes trickle
        in: a timeout per read let a byte every few seconds keep a 64 MiB partial frame for good),
        else the idle timeout of a connection without a pool."""
        if frames.pending:
            return max(0.0, frame_started + self.config.socket_frame_timeout_s - time.monotonic())
        return None if conn.pooled else self.config.socket_idle_timeout_s

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._ids)
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = _peer_credentials(sock)
        except OSError:
            pid = uid = gid = -1
        clog = log.bind(conn=conn_id, peer_pid=pid, peer_uid=uid, peer_gid=gid)
        per_uid = self.config.socket_max_connections_per_uid
        held = sum(1 for c in self._conns.values() if c.uid == uid)
        refusal: tuple[str, str, str, str] | None = None  # counter, log reason, reply kind, message
        if held >= per_uid and not self._make_room(uid):
            refusal = ("engine_conn_per_uid", "max_connections_per_uid", "busy",
                       f"uid {uid} holds {held} connections (socket.max_connections_per_uid {per_uid}), "
                       "all holding pools")
        elif len(self._conns) >= self.config.socket_max_connections and not self._make_room():
            refusal = ("busy", "max_connections", "busy",
                       f"kvd serves {len(self._conns)} connections (socket.max_connections), all holding pools")
        elif self.access is not None:
            refused = self.access.refusal(Credentials(pid, uid, gid))
            if refused:  # the allow-list: before anything of the connection is read
                refusal = ("forbidden", refused, "forbidden", refused)
        if refusal is not None:
            counter, reason, kind, message = refusal
            self.handler.count_error(counter)
            clog.warning("engine_connection_refused", reason=reason)
            writer.write(frame(ErrorReply(req_id=0, kind=kind, message=message).encode()))
            writer.close()
            return
        if self.access is not None:
            self.access.connected(conn_id, Credentials(pid, uid, gid))
        clog.info("engine_connected")
        conn = self._conns[conn_id] = _Conn(writer, time.monotonic(), uid)
        frames = FrameBuffer(self.config.socket_max_frame_bytes)
        frame_started = 0.0  # when the first byte of the frame now pending arrived
        try:
            while True:
                timeout = self._timeout(conn, frames, frame_started)
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(1 << 20)
                except TimeoutError:
                    what = "partial_frame" if frames.pending else "idle"
                    self.handler.count_error(f"engine_{what}_timeout")
                    clog.warning("engine_connection_timeout", reason=what, seconds=timeout,
                                 buffered=frames.pending)
                    break
                if not data:
                    break
                conn.last_active = passed = time.monotonic()
                if not frames.pending:
                    frame_started = passed
                frames.feed(data)
                took = False
                while (payload := frames.next_payload()) is not None:
                    took = True
                    reply = await self._handle_async(conn_id, payload, reader)
                    if isinstance(reply, PoolRegistered):
                        conn.pooled = True
                    conn.queue(self._encoded(reply))
                    if conn.unread() > self.config.socket_max_frame_bytes:
                        # An engine that asks and does not read (a status is a snapshot of the
                        # rooms for a 12-byte request) waits here for its reader, past a frame's
                        # worth of unread output: not a buffer that grows with every request of a read.
                        conn.flush()
                        await writer.drain()
                        passed = time.monotonic()
                    elif time.monotonic() - passed > YIELD_S:
                        # A burst of requests (a status costs a pass over the rooms) must
                        # not hold the loop: other engines, the peers and housekeeping get a turn.
                        conn.flush()
                        await asyncio.sleep(0)
                        passed = time.monotonic()
                conn.flush()
                # Back-pressure on an engine that does not read, but never halfway through one of
                # its requests: an engine writing a large frame reads nothing until it is sent,
                # and events pushed meanwhile would leave both sides waiting on the other
                # (drain() here, sendall() there). Past a frame's worth of unread output: drain.
                if not frames.pending or conn.unread() > self.config.socket_max_frame_bytes:
                    await writer.drain()
                if took:
                    # What is left, if anything, is a frame begun in this read: its time runs from
                    # now, not while the daemon worked on the requests before it (a registration).
                    frame_started = time.monotonic()
        except ProtocolError as exc:  # a broken frame header: the stream cannot be resynchronised
            self.handler.count_error("protocol")
            clog.warning("engine_stream_error", error=str(exc))
            conn.queue(frame(ErrorReply(req_id=0, kind="protocol", message=str(exc)).encode()))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(conn_id, None)
            clog.info("engine_disconnected")
            self.handler.engine_gone(conn_id)  # before its credentials go: its engines' names keep its uid
            if self.access is not None:
                self.access.gone(conn_id)
            conn.flush()  # what was queued for it (the last replies) goes before the close
            writer.close()

    async def _handle_async(self, conn_id: int, payload: bytes,
                            reader: asyncio.StreamReader | None = None) -> Message:
        """:meth:`_handle`, with a large request decoded in a worker thread first, and a reply
        the handler must still work for awaited (its failure refused like any other). An engine
        that closes its connection meanwhile (it crashed, or gave up waiting) has that work
        cancelled (a registration still queued is never carried out) and the connection ends
        (ConnectionResetError), as it would have once the work was done."""
        decoded: Message | Exception | None = None
        if len(payload) > self.config.socket_offload_bytes:
            try:
                decoded = await asyncio.get_running_loop().run_in_executor(None, decode, payload)
            except ProtocolError as exc:
                decoded = exc
        reply = self._handle(conn_id, payload, decoded)
        if not isinstance(reply, _Pending):
            return reply
        work = asyncio.ensure_future(reply.work)
        try:
            gone = await _engine_left(work, reader)
        except asyncio.CancelledError:
            work.cancel()
            raise
        if gone:
            raise ConnectionResetError("the engine closed its connection during its request")
        # Read, not re-raised: a re-raised exception's traceback would take this frame, whose
        # ``work`` holds the exception (a cycle that kept each refused request, a 16 MiB layout
        # map included, until the cyclic collector ran: test_layout_cache_hoard).
        failure = work.exception()
        if failure is None:
            return work.result()
        if not isinstance(failure, Exception):
            raise failure
        return self._refuse(conn_id, failure, reply.msg)

    def _handle(self, conn_id: int, payload: bytes,
                decoded: Message | Exception | None = None) -> Message | _Pending:
        """One request -> one reply (or the work that makes it). Never raises: every failure
        becomes an ErrorReply."""
        msg: Message | None = None
        try:
            if isinstance(decoded, Exception):
                raise decoded
            msg = decode(payload) if decoded is None else decoded
            if not isinstance(msg, ENGINE_REQUESTS):
                raise RequestError("protocol", f"{type(msg).__name__} is not an engine request")
            check_request(msg)
            reply = self.handler.on_engine_request(conn_id, msg)
            return reply if isinstance(reply, Message) else _Pending(msg, reply)
        except Exception as exc:
            return self._refuse(conn_id, exc, msg, payload)

    def _refuse(self, conn_id: int, exc: Exception, msg: Message | None, payload: bytes = b"") -> ErrorReply:
        """The ErrorReply for a failed request, counted and logged by its kind. A request whose
        fields did not decode is answered under the req_id its raw frame shows, so the engine
        waiting on it hears the refusal instead of waiting out its timeout."""
        req_id = getattr(msg, "req_id", 0) if msg is not None else request_id(payload)
        room = getattr(msg, "room", -1)
        if isinstance(exc, ProtocolError):
            kind, text, room = "protocol", str(exc), -1
        elif isinstance(exc, RequestError):
            kind, text, room = exc.kind, str(exc), exc.room
        elif isinstance(exc, LayoutError):
            kind, text, room = "layout", str(exc), -1
        elif isinstance(exc, PoolMemoryError | TransportError):
            kind, text, room = "registration", str(exc), -1
        elif isinstance(exc, TooManyRooms):  # back-pressure: the engine may retry once rooms end
            kind, text = "busy", str(exc)
        elif isinstance(exc, PlanError | RoomError):
            kind, text = "bad_request", str(exc)
        else:  # a bug must cost one request, not the daemon
            log.error("engine_request_bug", error=str(exc), exc_info=exc)
            kind, text, room = "internal", f"{type(exc).__name__}: {exc}", -1
        self.handler.count_error(kind)
        # A poll of a room not (or no longer) here is an answer engines poll for, not an incident.
        (log.debug if kind == "unknown_room" else log.warning)("engine_request_refused", conn=conn_id,
                                                               kind=kind, error=text)
        return ErrorReply(req_id=req_id if isinstance(req_id, int) else 0, kind=kind, message=text,
                          room=room if isinstance(room, int) else -1)


async def _engine_left(work: asyncio.Future[Message], reader: asyncio.StreamReader | None) -> bool:
    """Wait for ``work``; True (and the work cancelled) if the engine closed its connection first
    (end of stream with nothing more it asked for unread)."""
    while not work.done():
        await asyncio.wait({work}, timeout=GONE_POLL_S if reader is not None else None)
        if reader is not None and not work.done() and reader.at_eof():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return True
    return False


@dataclass(frozen=True)
class _Pending:
    """A request whose reply is still being worked on (see :meth:`EngineHandler.on_engine_request`)."""

    msg: Message
    work: Awaitable[Message]


__all__ = ["EngineServer", "EngineHandler", "RequestError", "check_request", "prepare_socket_path"]
