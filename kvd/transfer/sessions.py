"""Per-peer receive sessions: the write fence that holds even when a peer is stalled or cut off.

A one-sided write lands in memory that the *receiving* transport has registered. If every
sending peer writes through a receive session of its own (announced to that peer only),
then revoking the session — unregistering its memory and closing it — makes every later
write from that peer fail at the receiving end, whatever the peer does afterwards,
including resuming after a SIGSTOP with a batch half sent. (Mooncake's TCP server refuses
a write whose destination is not registered with it; RDMA invalidates the keys of a
deregistered region; closing the session ends its connections.) The daemon revokes a
peer's session before it releases pages that peer may still write, so the fence is a
fact of the receiving process, not a hope about the sender's clock.

:class:`SessionedTransport` is the daemon's transport: writes go out through the main
transport, memory is registered with the main transport and every receive session, and
peers are told the receive session meant for them. Never call a blocking transport
method from the event loop: opening and closing sessions run in the default executor, and
memory is registered from the daemon's registrar thread, so every change to the set of
regions or sessions happens under one lock, and ``_sessions`` is replaced, never changed in
place (the loop reads it without the lock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

import numpy as np
import structlog

from kvd.core.rows import RowBatch
from kvd.transfer.base import BatchResult, Transport, TransportError, write_plan

log = structlog.get_logger("kvd.transfer")


class SessionedTransport:
    """A :class:`~kvd.transfer.base.Transport` with one revocable receive session per peer."""

    def __init__(self, main: Transport, open_session: Callable[[], Transport]) -> None:
        self.main = main
        self.session_id = main.session_id  # peers are told their receive session instead
        self.protocol = main.protocol
        self.devices = main.devices
        self._open_session = open_session
        self._regions: dict[int, int] = {}
        self._sessions: dict[str, Transport] = {}  # replaced whole under _lock, read freely
        self._lock = threading.Lock()
        self._opening: dict[str, asyncio.Task[Transport]] = {}
        self._revoking: dict[str, asyncio.Task[None]] = {}
        self.revocations = 0

    # --- the Transport surface (writes go out through the main transport) -----------------------
    def register(self, addr: int, length: int) -> None:
        with self._lock:
            self.main.register(addr, length)
            for session in self._sessions.values():
                session.register(addr, length)
            self._regions[addr] = length

    def unregister(self, addr: int) -> None:
        with self._lock:
            self._regions.pop(addr, None)
            for session in self._sessions.values():
                session.unregister(addr)
            self.main.unregister(addr)

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray,
                    length: np.ndarray) -> BatchResult:
        return await self.main.write(peer_session, src, dst, length)

    async def write_rows(self, peer_session: str, batch: RowBatch) -> BatchResult:
        """Row copies go to the main transport whole where it takes them, else as ops."""
        return await write_plan(self.main, peer_session, batch)

    def close(self) -> None:
        """Close every session and the main transport, at once: each close joins a Mooncake
        engine's threads (~1 s), and a restart must not wait one second per peer."""
        with self._lock:
            closing = [*self._sessions.values(), self.main]
            self._sessions = {}
        with concurrent.futures.ThreadPoolExecutor(len(closing)) as pool:
            for future in [pool.submit(t.close) for t in closing]:
                try:
                    future.result()
                except TransportError as exc:
                    log.error("transport_close_failed", error=str(exc))

    # --- receive sessions ------------------------------------------------------------------------
    async def receive_session(self, peer: str) -> str:
        """The session id ``peer`` must write into (opened on first use, after a revocation anew)."""
        revoking = self._revoking.get(peer)
        if revoking is not None:  # never the session being revoked
            await asyncio.shield(revoking)
        session = self._sessions.get(peer)
        if session is not None:
            return session.session_id
        task = self._opening.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(peer), name=f"open-session-{peer}")
            self._opening[peer] = task
        return (await asyncio.shield(task)).session_id

    async def _open(self, peer: str) -> Transport:
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(None, self._open_session)
            await loop.run_in_executor(None, self._fill, peer, session)
        finally:
            self._opening.pop(peer, None)
        log.info("receive_session_opened", peer=peer, session=session.session_id)
        return session

    def _fill(self, peer: str, session: Transport) -> None:
        """Register every region with a new session and add it, in one step under the lock: a
        region registered or unregistered meanwhile cannot be missed or left writable."""
        with self._lock:
            for addr, length in self._regions.items():
                session.register(addr, length)
            self._sessions = {**self._sessions, peer: session}

    def has_session(self, peer: str) -> bool:
        return peer in self._sessions or peer in self._opening

    async def revoke(self, peer: str, reason: str) -> None:
        """Close ``peer``'s receive session: once this returns, no write from it can land."""
        task = self._revoking.get(peer)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._revoke(peer, reason), name=f"revoke-{peer}")
            self._revoking[peer] = task
        await asyncio.shield(task)

    async def _revoke(self, peer: str, reason: str) -> None:
        try:
            opening = self._opening.get(peer)
            if opening is not None:
                await asyncio.gather(opening, return_exceptions=True)
            loop = asyncio.get_running_loop()
            # Off the loop: the lock may be held by a registration (a GPU region: up to a second).
            session = await loop.run_in_executor(None, self._withdraw, peer)
            if session is None:
                return
            self.revocations += 1
            log.warning("receive_session_revoked", peer=peer, session=session.session_id, reason=reason)
            try:
                await loop.run_in_executor(None, session.close)
            except TransportError as exc:  # closing failed: the memory is unregistered all the same
                log.error("receive_session_close_failed", peer=peer, error=str(exc))
        finally:
            self._revoking.pop(peer, None)

    def _withdraw(self, peer: str) -> Transport | None:
        with self._lock:
            session = self._sessions.get(peer)
            if session is not None:
                self._sessions = {p: t for p, t in self._sessions.items() if p != peer}
            return session

    def sessions(self) -> dict[str, str]:
        return {peer: s.session_id for peer, s in self._sessions.items()}


__all__ = ["SessionedTransport"]
