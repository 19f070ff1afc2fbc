"""A blocking client whose pushed room events are read as they arrive.

:class:`KvdClient` reads the daemon's pushed RoomEvents only while it waits for some other
reply, so an engine that polls many rooms per scheduler loop would pay a socket round trip per
room (~200-400 us). :class:`BackgroundKvdClient` runs an :class:`AsyncKvdClient` on its own
event-loop thread: requests are blocking calls, and every pushed event lands in a local view
the moment it arrives. :meth:`pushed` / :meth:`pushed_many` answer from that view without any
I/O (a dict lookup per room), and a room's final state stays there until :meth:`forget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from kvd.core.layout import PoolLayout
from kvd.engineclient.client import (
    AsyncKvdClient,
    HostPool,
    KvdConnectionError,
    KvdTimeout,
    Pages,
    RoomStatus,
)

R = TypeVar("R")


class BackgroundKvdClient:
    """Blocking calls, background reader; safe to call from several threads."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvd-client-loop", daemon=True)
        self._thread.start()
        self._client = AsyncKvdClient(socket_path, timeout=timeout)
        try:
            self._call(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, R], limit: float | None = -1.0) -> R:
        """Run ``coro`` on the loop; a safety net past its own limit (``limit``: the caller's
        wait, None: none; by default the request timeout)."""
        limit = self.timeout if limit is not None and limit < 0 else limit
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # closed: a request after close() is refused like one on a lost connection
            coro.close()
            raise KvdConnectionError(f"kvd at {self.socket_path}: client is closed", kind="connection") from None
        try:
            return fut.result(None if limit is None else limit + 5.0)
        except TimeoutError:
            fut.cancel()
            raise KvdTimeout(f"kvd at {self.socket_path}: no reply within {limit}s",
                             kind="timeout") from None

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            with contextlib.suppress(Exception):  # already broken: closing is best effort
                self._call(self._client.close())
        self._stop_loop()

    def __enter__(self) -> BackgroundKvdClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- requests (one socket round trip each) -------------------------------------------
    def register_pool(self, layout: PoolLayout, memory: dict[str, Any] | HostPool, bootstrap: str = "") -> int:
        return self._call(self._client.register_pool(layout, memory, bootstrap))

    def send(self, pool_id: int, room: int, pages: Pages, is_last: bool, aux: bytes = b"", *,
             wait: bool = True) -> None:
        self._call(self._client.send(pool_id, room, pages, is_last, aux, wait=wait))

    def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str, pages: Pages,
             timeout_s: float = 0.0, enable_hisparse: bool = False) -> None:
        self._call(self._client.recv(pool_id, room, bootstrap_addr, prefill_engine_id, pages, timeout_s,
                                     enable_hisparse))

    def poll(self, room: int) -> RoomStatus:
        """The room's state asked of the daemon (a round trip); prefer :meth:`pushed`."""
        return self._call(self._client.poll(room))

    def abort(self, pool_id: int, room: int) -> None:
        self._call(self._client.abort(pool_id, room))

    def status(self) -> dict[str, Any]:
        return self._call(self._client.status())

    def wait(self, room: int, timeout: float | None = None) -> RoomStatus:
        return self._call(self._client.wait(room, timeout), timeout)

    def wait_released(self, room: int, timeout: float | None = None) -> RoomStatus:
        return self._call(self._client.wait_released(room, timeout), timeout)

    # --- the local view (no I/O) ----------------------------------------------------------
    def pushed(self, room: int) -> RoomStatus | None:
        """The latest event the daemon pushed for ``room`` (None: none yet)."""
        return self._client.pushed(room)

    def pushed_many(self, rooms: Iterable[int]) -> list[RoomStatus | None]:
        """:meth:`pushed` for many rooms at once: the scheduler-loop view."""
        get = self._client.pushed
        return [get(room) for room in rooms]

    def forget(self, room: int) -> None:
        """Drop what is known of a room the engine is done with."""
        try:
            self._loop.call_soon_threadsafe(self._client.forget, room)
        except RuntimeError:  # the client was closed: its loop runs no more, nothing races this
            self._client.forget(room)

    @property
    def connected(self) -> bool:
        return self._client.connected


__all__ = ["BackgroundKvdClient"]
