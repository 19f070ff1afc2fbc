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
from typing import Protocol

import structlog

from kvd.core.config import Config
from kvd.core.layout import LayoutError
from kvd.core.planner import PlanError
from kvd.core.rooms import RoomError
from kvd.mem.memory import PoolMemoryError
from kvd.transfer.base import TransportError
from kvd.wire.codec import Message, ProtocolError, decode
from kvd.wire.engine import ENGINE_REQUESTS, ErrorReply
from kvd.wire.framing import MAX_FRAME_BYTES, FrameBuffer, frame

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

    def on_engine_request(self, conn_id: int, msg: Message) -> Message: ...
    def engine_gone(self, conn_id: int) -> None: ...
    def count_error(self, kind: str) -> None: ...


class EngineServer:
    def __init__(self, config: Config, handler: EngineHandler) -> None:
        self.config = config
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)

    async def start(self) -> None:
        c = self.config
        prepare_socket_path(c.socket_path)
        old = os.umask(0o177)  # the socket never exists world-accessible, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=c.socket_path,
                                                           limit=MAX_FRAME_BYTES)
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
            os.unlink(self.config.socket_path)

    def push(self, conn_id: int, msg: Message) -> None:
        writer = self._writers.get(conn_id)
        if writer is not None and not writer.is_closing():
            writer.write(frame(msg.encode()))

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
        frames = FrameBuffer()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                frames.feed(data)
                while (payload := frames.next_payload()) is not None:
                    writer.write(frame(self._handle(conn_id, payload).encode()))
                await writer.drain()
        except ProtocolError as exc:  # a broken frame header: the stream cannot be resynchronised
            self.handler.count_error("protocol")
            clog.warning("engine_stream_error", error=str(exc))
            writer.write(frame(ErrorReply(req_id=0, kind="protocol", message=str(exc)).encode()))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.pop(conn_id, None)
            clog.info("engine_disconnected")
            self.handler.engine_gone(conn_id)
            writer.close()

    def _handle(self, conn_id: int, payload: bytes) -> Message:
        """One request -> one reply. Never raises: every failure becomes an ErrorReply."""
        req_id = 0
        try:
            msg = decode(payload)
            req_id = getattr(msg, "req_id", 0)
            if not isinstance(msg, ENGINE_REQUESTS):
                raise RequestError("protocol", f"{type(msg).__name__} is not an engine request")
            return self.handler.on_engine_request(conn_id, msg)
        except ProtocolError as exc:
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
        self.handler.count_error(kind)
        log.warning("engine_request_refused", conn=conn_id, kind=kind, error=text)
        return ErrorReply(req_id=req_id if isinstance(req_id, int) else 0, kind=kind, message=text,
                            room=room)


__all__ = ["EngineServer", "EngineHandler", "RequestError", "prepare_socket_path"]
