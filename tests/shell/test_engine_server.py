"""The engine socket bounded (issue 12, item 6) and request shapes checked before the daemon
acts (item 8): a real EngineServer on a temporary Unix socket with a recording handler."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvd.core.config import Config
from kvd.shell.engine_server import EngineServer
from kvd.wire import engine as we
from kvd.wire.codec import Message, decode
from kvd.wire.framing import FrameBuffer, frame

LAYOUT = dict(engine_id="P", role="prefill", tp_size=1, tp_rank=0, num_layers=2, total_kv_heads=4, head_dim=8,
              dtype="bfloat16", page_size=4, num_pages=16)


class Handler:
    def __init__(self) -> None:
        self.requests: list[Message] = []
        self.gone: list[int] = []
        self.errors: Counter[str] = Counter()

    def on_engine_request(self, conn_id: int, msg: Message) -> Message:
        self.requests.append(msg)
        if isinstance(msg, we.RegisterPool):
            return we.PoolRegistered(req_id=msg.req_id, pool_id=1)
        return we.Ok(req_id=getattr(msg, "req_id", 0))

    def engine_gone(self, conn_id: int) -> None:
        self.gone.append(conn_id)

    def count_error(self, kind: str) -> None:
        self.errors[kind] += 1


@pytest.fixture
async def server(tmp_path: Path):
    made: list[EngineServer] = []

    async def make(**config: Any) -> tuple[EngineServer, Handler, str]:
        path = str(tmp_path / f"kvd{len(made)}.sock")
        handler = Handler()
        srv = EngineServer(Config(socket_path=path, **config), handler)
        await srv.start()
        made.append(srv)
        return srv, handler, path

    yield make
    for srv in made:
        await srv.stop()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.frames = reader, writer, FrameBuffer()

    @classmethod
    async def open(cls, path: str) -> Conn:
        return cls(*await asyncio.open_unix_connection(path))

    async def ask(self, msg: Message) -> Message:
        self.writer.write(frame(msg.encode()))
        return await self.reply()

    async def reply(self, timeout: float = 5.0) -> Message:
        async with asyncio.timeout(timeout):
            while (payload := self.frames.next_payload()) is None:
                data = await self.reader.read(65536)
                assert data, "connection closed"
                self.frames.feed(data)
        return decode(payload)

    async def closed(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while data := await self.reader.read(65536):
                    self.frames.feed(data)
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize("engine_id", [17, None, ["a"], {"x": 1}, ""])
async def test_a_non_string_engine_id_is_a_layout_error_and_nothing_is_registered(server, engine_id):
    """Before: an 'internal' error after the pool had been opened and registered."""
    _, handler, path = await server()
    c = await Conn.open(path)
    reply = await c.ask(we.RegisterPool(req_id=5, layout={**LAYOUT, "engine_id": engine_id},
                                        memory={"kind": "shm"}))
    assert isinstance(reply, we.ErrorReply) and reply.kind == "layout" and reply.req_id == 5
    assert "engine_id" in reply.message and not handler.requests
    c.close()


@pytest.mark.parametrize("addr", ["tcp://127.0.0.1", "tcp://127.0.0.1:0", "127.0.0.1:5", "tcp://h:1 x"])
async def test_an_unusable_bootstrap_address_is_refused_up_front(server, addr):
    """Before: 'tcp://127.0.0.1' passed and made PeerHub.send raise inside housekeeping."""
    _, handler, path = await server()
    c = await Conn.open(path)
    reply = await c.ask(we.RecvRoom(req_id=1, pool_id=1, room=3, bootstrap_addr=addr, prefill_engine_id="P",
                                    pages=np.array([1], dtype=np.int64)))
    assert isinstance(reply, we.ErrorReply) and reply.kind == "bad_request" and "tcp://host:port" in reply.message
    reply = await c.ask(we.RegisterPool(req_id=2, layout=LAYOUT, memory={"kind": "shm"}, bootstrap=addr))
    assert isinstance(reply, we.ErrorReply) and reply.kind == "bad_request"
    assert not handler.requests
    c.close()


async def test_an_oversized_frame_is_refused_before_it_is_buffered(server):
    srv, handler, path = await server(socket_max_frame_bytes=1 << 20)
    c = await Conn.open(path)
    c.writer.write(struct.pack(">I", 250 << 20) + b"x" * 1000)  # the start of a 250 MiB frame
    reply = await c.reply()
    assert isinstance(reply, we.ErrorReply) and reply.kind == "protocol" and "exceeds" in reply.message
    assert await c.closed() and handler.errors["protocol"] == 1
    c2 = await Conn.open(path)  # the daemon goes on
    assert isinstance(await c2.ask(we.StatusRequest(req_id=1)), we.Ok)
    c2.close()


async def test_a_partial_frame_times_out(server):
    """Before: a started frame could sit in memory forever (eight of them: 2 GB)."""
    _, handler, path = await server(socket_frame_timeout_s=0.3)
    c = await Conn.open(path)
    c.writer.write(struct.pack(">I", 1000) + b"x" * 10)
    start = time.monotonic()
    assert await c.closed()
    assert 0.2 < time.monotonic() - start < 3 and handler.errors["engine_partial_frame_timeout"] == 1


async def test_an_idle_connection_without_a_pool_times_out_but_an_engine_stays(server):
    _, handler, path = await server(socket_idle_timeout_s=0.3)
    idle = await Conn.open(path)
    engine = await Conn.open(path)
    assert isinstance(await engine.ask(we.RegisterPool(req_id=1, layout=LAYOUT, memory={"kind": "shm"})),
                      we.PoolRegistered)
    assert await idle.closed()
    await asyncio.sleep(0.5)
    assert isinstance(await engine.ask(we.StatusRequest(req_id=2)), we.Ok)
    assert handler.errors["engine_idle_timeout"] == 1
    engine.close()


async def test_the_connection_limit_evicts_an_idle_connection_without_a_pool(server):
    """Before: idle connections at the fd limit locked new engines out."""
    srv, handler, path = await server(socket_max_connections=3)
    engine = await Conn.open(path)
    assert isinstance(await engine.ask(we.RegisterPool(req_id=1, layout=LAYOUT, memory={"kind": "shm"})),
                      we.PoolRegistered)
    idle = [await Conn.open(path) for _ in range(2)]
    await asyncio.sleep(0.05)
    newcomer = await Conn.open(path)
    assert isinstance(await newcomer.ask(we.StatusRequest(req_id=1)), we.Ok)
    assert await idle[0].closed() and handler.errors["engine_conn_evicted"] == 1
    assert srv.connections() == 3
    # every connection holds a pool: a newcomer gets a clear "busy"
    for c in (idle[1], newcomer):
        assert isinstance(await c.ask(we.RegisterPool(req_id=2, layout=LAYOUT, memory={"kind": "shm"})),
                          we.PoolRegistered)
    late = await Conn.open(path)
    reply = await late.reply()
    assert isinstance(reply, we.ErrorReply) and reply.kind == "busy"


async def test_one_uid_cannot_take_every_connection(server, monkeypatch):
    """Before: one user's connections could fill socket.max_connections and lock every other
    user's engines out. Per uid: its own idle connection makes room, else "busy" (counted);
    another uid still connects. Credentials are faked per accepted connection, in order."""
    uids = iter([1001, 1001, 1001, 1001, 1002])
    monkeypatch.setattr("kvd.shell.engine_server._peer_credentials", lambda sock: (1, next(uids), 1))
    srv, handler, path = await server(socket_max_connections=8, socket_max_connections_per_uid=2)
    held = [await Conn.open(path) for _ in range(2)]
    for i, c in enumerate(held):
        assert isinstance(await c.ask(we.RegisterPool(req_id=i, layout=LAYOUT, memory={"kind": "shm"})),
                          we.PoolRegistered)
    idle = await Conn.open(path)  # uid 1001's third: over its limit, nothing of its own to evict
    reply = await idle.reply()
    assert isinstance(reply, we.ErrorReply) and reply.kind == "busy" and "max_connections_per_uid" in reply.message
    assert handler.errors["engine_conn_per_uid"] == 1
    held[1].close()  # one of its engines goes: the uid connects again
    await asyncio.sleep(0.1)
    again = await Conn.open(path)
    assert isinstance(await again.ask(we.StatusRequest(req_id=9)), we.Ok)
    other = await Conn.open(path)  # uid 1002
    assert isinstance(await other.ask(we.StatusRequest(req_id=1)), we.Ok)
    assert srv.connections() == 3 and handler.errors["engine_conn_per_uid"] == 1
    for c in (held[0], again, other):
        c.close()


async def test_a_uid_at_its_limit_evicts_its_own_idle_connection_not_anothers(server, monkeypatch):
    uids = iter([1001, 1002, 1001, 1001])
    monkeypatch.setattr("kvd.shell.engine_server._peer_credentials", lambda sock: (1, next(uids), 1))
    srv, handler, path = await server(socket_max_connections=8, socket_max_connections_per_uid=2)
    mine, theirs = await Conn.open(path), await Conn.open(path)
    engine = await Conn.open(path)
    assert isinstance(await engine.ask(we.RegisterPool(req_id=1, layout=LAYOUT, memory={"kind": "shm"})),
                      we.PoolRegistered)
    newcomer = await Conn.open(path)
    assert isinstance(await newcomer.ask(we.StatusRequest(req_id=1)), we.Ok)
    assert await mine.closed() and handler.errors["engine_conn_evicted"] == 1
    assert isinstance(await theirs.ask(we.StatusRequest(req_id=2)), we.Ok)
    for c in (theirs, engine, newcomer):
        c.close()


async def test_a_large_request_is_decoded_off_the_loop(server, monkeypatch):
    _, handler, path = await server(socket_offload_bytes=1024)
    loop_thread: list[bool] = []
    import threading

    import kvd.shell.engine_server as es

    real = es.decode

    def spy(payload: bytes) -> Message:
        loop_thread.append(threading.current_thread() is threading.main_thread())
        return real(payload)

    monkeypatch.setattr(es, "decode", spy)
    c = await Conn.open(path)
    pages = np.arange(10_000, dtype=np.int64)
    reply = await c.ask(we.SendChunk(req_id=9, pool_id=1, room=1, pages=pages, is_last=True))
    assert isinstance(reply, we.Ok) and reply.req_id == 9
    assert isinstance(await c.ask(we.StatusRequest(req_id=10)), we.Ok)
    assert loop_thread == [False, True]  # the big one in a worker, the small one on the loop
    assert np.array_equal(handler.requests[0].pages, pages)
    c.close()


async def test_a_reply_that_cannot_be_encoded_costs_that_reply_not_the_connection(server):
    """A number past 64 bits in a reply (a broken peer's byte count reaching a poll's answer) used
    to raise in the serve loop and close the engine's connection: every pool and room on it."""
    _, handler, path = await server()
    answer = handler.on_engine_request

    def huge(conn_id: int, msg: Message) -> Message:
        if isinstance(msg, we.PollRoom):
            return we.RoomEvent(req_id=msg.req_id, room=msg.room, state="transferring", bytes_done=1 << 64)
        return answer(conn_id, msg)

    handler.on_engine_request = huge  # type: ignore[method-assign]
    c = await Conn.open(path)
    bad = await c.ask(we.PollRoom(req_id=7, room=3))
    assert isinstance(bad, we.ErrorReply) and bad.kind == "internal" and bad.req_id == 7, bad
    assert handler.errors["internal"] == 1
    ok = await c.ask(we.PollRoom(req_id=8, room=3))
    assert isinstance(ok, we.ErrorReply) and ok.req_id == 8  # the connection still answers
    assert isinstance(await c.ask(we.StatusRequest(req_id=9)), we.Ok)


@pytest.mark.parametrize("offload", [1 << 20, 16], ids=["on_loop", "offloaded"])
async def test_a_request_whose_fields_do_not_decode_is_refused_under_its_own_req_id(server, offload):
    """A request whose header and req_id are fine but whose fields are not (pages as a string, a
    truncated frame, a broken byte after the req_id) was refused under req_id 0: the engine
    waiting on its request id read past the refusal and waited out its whole timeout."""
    import msgpack

    _, handler, path = await server(socket_offload_bytes=offload)
    c = await Conn.open(path)
    bad_fields = msgpack.packb([1, we.SendChunk.TYPE, 41, 1, 3, "not pages", True], use_bin_type=True)
    truncated = msgpack.packb([1, we.RecvRoom.TYPE, 42, 1, 3], use_bin_type=True)
    broken_tail = msgpack.packb([1, we.PollRoom.TYPE, 43, 5], use_bin_type=True)[:-1] + b"\xc1"
    for payload, req_id in ((bad_fields, 41), (truncated, 42), (broken_tail, 43)):
        c.writer.write(frame(payload))
        reply = await c.reply()
        assert isinstance(reply, we.ErrorReply) and reply.kind == "protocol", reply
        assert reply.req_id == req_id, f"refused under req_id {reply.req_id}, the request was #{req_id}"
    # No req_id to be found: garbage, an unknown type, a req_id that is no integer -> 0, as before.
    for payload in (b"\x93\x01", msgpack.packb([1, 99, 44, "x"]), msgpack.packb([1, 5, "45", 1])):
        c.writer.write(frame(payload))
        reply = await c.reply()
        assert isinstance(reply, we.ErrorReply) and reply.req_id == 0, reply
    assert handler.requests == [] and handler.errors["protocol"] == 6
    assert isinstance(await c.ask(we.StatusRequest(req_id=46)), we.Ok)  # and the connection goes on
    c.close()
