"""The engine server keeps reading an engine's requests while that engine has not read its
pushed events: a burst of room events it has not read yet must not stall a large request
(both sides would wait on the other: the daemon in drain(), the engine in sendall())."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import numpy as np

from kvd.core.config import Config
from kvd.engineclient.client import KvdClient
from kvd.shell.engine_server import EngineServer
from kvd.wire import protocol as p


class _Handler:
    def __init__(self) -> None:
        self.conns: list[int] = []

    def on_engine_request(self, conn_id: int, msg: Any) -> Any:
        self.conns.append(conn_id)
        return p.Ok(req_id=msg.req_id)

    def engine_gone(self, conn_id: int) -> None:
        pass

    def count_error(self, kind: str) -> None:
        pass


def test_unread_pushed_events_do_not_stall_a_large_request() -> None:
    path = f"/tmp/kvd-test-push-{os.getpid()}.sock"
    loop = asyncio.new_event_loop()
    handler = _Handler()
    server = EngineServer(Config(socket_path=path), handler)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    try:
        with KvdClient(path, timeout=3) as c:
            c.abort(1, 1)  # the connection is known
            conn_id = handler.conns[0]

            def burst() -> None:  # ~1 MB of room events the engine has not read yet
                for room in range(25_000):
                    server.push(conn_id, p.RoomEvent(req_id=0, room=room, state="success", released=True))

            loop.call_soon_threadsafe(burst)
            time.sleep(0.5)
            c.send(1, 5, np.arange(1_000_000), is_last=True, wait=False)  # an 8 MB request
            c.send(1, 6, [0], is_last=True)  # and its reply comes
            assert c.pushed(24_999) is not None
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
