"""The local API: engines talk to kvd over a Unix socket, one coroutine per connection.

The socket is created with an explicit mode (0660 by default, never world-writable),
its directory is created, a stale socket left by a dead daemon is replaced but a
live one is not, and every connection's peer uid/gid/pid (SO_PEERCRED) is logged.
Each request gets exactly one reply with its req_id; bad input gets an ErrorReply
and a counter, and the connection and the daemon carry on.
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
from typing import TYPE_CHECKING

import structlog

from kvd.core.layout import LayoutError
from kvd.core.planner import PlanError
from kvd.core.rooms import RoomError
from kvd.mem.memory import PoolMemoryError
from kvd.transfer.mooncake import TransportError
from kvd.wire import protocol as p

if TYPE_CHECKING:
    from kvd.shell.daemon import Daemon

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


class EngineServer:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._server: asyncio.AbstractServer | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)

    async def start(self) -> None:
        c = self.d.config
        prepare_socket_path(c.socket_path)
        old = os.umask(0o177)  # the socket never exists world-accessible, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=c.socket_path,
                                                           limit=p.MAX_FRAME_BYTES)
        finally:
            os.umask(old)
        os.chmod(c.socket_path, c.socket_mode)
        if c.socket_group:
            os.chown(c.socket_path, -1, grp.getgrnam(c.socket_group).gr_gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers.values():
            w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.d.config.socket_path)

    def push(self, conn_id: int, msg: p.Message) -> None:
        writer = self._writers.get(conn_id)
        if writer is not None and not writer.is_closing():
            writer.write(p.frame(msg.encode()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._ids)
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, gid = _peer_credentials(sock)
        except OSError:
            pid = uid = gid = -1
        clog = log.bind(conn=conn_id, peer_pid=pid, peer_uid=uid, peer_gid=gid)
        clog.info("engine_connected")
        self._writers[conn_id] = writer
        frames = p.FrameBuffer()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                frames.feed(data)
                while (payload := frames.next_payload()) is not None:
                    writer.write(p.frame(self._handle(conn_id, payload).encode()))
                await writer.drain()
        except p.ProtocolError as exc:  # a broken frame header: the stream cannot be resynchronised
            self.d.count_error("protocol")
            clog.warning("engine_stream_error", error=str(exc))
            writer.write(p.frame(p.ErrorReply(req_id=0, kind="protocol", message=str(exc)).encode()))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.pop(conn_id, None)
            clog.info("engine_disconnected")
            self.d.close_pools_of(conn_id)
            writer.close()

    def _handle(self, conn_id: int, payload: bytes) -> p.Message:
        """One request -> one reply. Never raises: every failure becomes an ErrorReply."""
        req_id = 0
        try:
            msg = p.decode(payload)
            req_id = getattr(msg, "req_id", 0)
            if not isinstance(msg, p.ENGINE_REQUESTS):
                raise RequestError("protocol", f"{type(msg).__name__} is not an engine request")
            return self._dispatch(conn_id, msg)
        except p.ProtocolError as exc:
            kind, text, room = "protocol", str(exc), -1
        except RequestError as exc:
            kind, text, room = exc.kind, str(exc), exc.room
        except LayoutError as exc:
            kind, text, room = "layout", str(exc), -1
        except (PoolMemoryError, TransportError) as exc:
            kind, text, room = "registration", str(exc), -1
        except (PlanError, RoomError) as exc:
            kind, text, room = "bad_request", str(exc), getattr(msg, "room", -1)
        except Exception as exc:  # a bug must cost one request, not the daemon
            log.exception("engine_request_bug", error=str(exc))
            kind, text, room = "internal", f"{type(exc).__name__}: {exc}", -1
        self.d.count_error(kind)
        log.warning("engine_request_refused", conn=conn_id, kind=kind, error=text)
        return p.ErrorReply(req_id=req_id if isinstance(req_id, int) else 0, kind=kind, message=text,
                            room=room)

    def _pool(self, conn_id: int, pool_id: int, role: str):
        pool = self.d.pools.get(pool_id)
        if pool is None or pool.conn_id != conn_id or pool.closing:
            raise RequestError("unknown_pool", f"pool {pool_id} is not registered on this connection")
        if pool.layout.role != role:
            raise RequestError("bad_request", f"pool {pool_id} is a {pool.layout.role} pool; "
                                              f"this call is for {role} pools")
        return pool

    def _dispatch(self, conn_id: int, msg: p.Message) -> p.Message:
        d = self.d
        match msg:
            case p.RegisterPool():
                pool = d.register_pool(conn_id, msg)
                return p.PoolRegistered(req_id=msg.req_id, pool_id=pool.pool_id)
            case p.SendChunk():
                pool = self._pool(conn_id, msg.pool_id, "prefill")
                pool.check_pages(msg.pages, f"room {msg.room} source pages")
                d.senders.on_chunk(pool, msg)
                return p.Ok(req_id=msg.req_id)
            case p.RecvRoom():
                pool = self._pool(conn_id, msg.pool_id, "decode")
                if msg.enable_hisparse:
                    from kvd.core.planner import check_token_indices
                    check_token_indices(msg.pages, pool.layout, f"room {msg.room} destination tokens")
                else:
                    pool.check_pages(msg.pages, f"room {msg.room} destination pages")
                if not msg.bootstrap_addr.startswith("tcp://"):
                    raise RequestError("bad_request", f"bootstrap address {msg.bootstrap_addr!r} "
                                                      "must look like tcp://host:port")
                d.receivers.start(pool, msg)
                return p.Ok(req_id=msg.req_id)
            case p.PollRoom():
                return self._poll(conn_id, msg)
            case p.AbortRoom():
                pool = d.pools.get(msg.pool_id)
                if pool is None or pool.conn_id != conn_id:
                    raise RequestError("unknown_pool", f"pool {msg.pool_id} is not registered on this connection")
                if pool.layout.role == "decode":
                    d.receivers.abort_from_engine(pool, msg.room)
                else:
                    d.senders.abort_from_engine(pool, msg.room, "aborted by the prefill engine")
                return p.Ok(req_id=msg.req_id)
            case p.StatusRequest():
                return p.StatusReply(req_id=msg.req_id, status=d.snapshot())
        raise RequestError("protocol", f"unhandled request {type(msg).__name__}")

    def _poll(self, conn_id: int, msg: p.PollRoom) -> p.Message:
        for rr in self.d.receivers.rooms.values():
            if rr.room == msg.room and rr.pool.conn_id == conn_id:
                return p.RoomEvent(req_id=msg.req_id, room=rr.room, state=rr.machine.state.value,
                                   reason=rr.machine.reason, bytes_done=rr.bytes_done,
                                   bytes_total=rr.bytes_total, released=rr.released)
        for sr in self.d.senders.rooms.values():
            if sr.room == msg.room and sr.pool.conn_id == conn_id:
                return p.RoomEvent(req_id=msg.req_id, room=sr.room, state=sr.machine.state.value,
                                   reason=sr.machine.reason, bytes_done=sr.bytes_done,
                                   bytes_total=sr.bytes_total)
        raise RequestError("unknown_room", f"no room {msg.room} in flight on this connection", msg.room)
