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
memory is registered from the daemon's registrar thread.

Locking: ``_lock`` guards only the two tables (regions, sessions) and is never held across a
transport call; ``_sessions`` is replaced, never changed in place (the loop reads it without the
lock). Each session has a lock of its own, held while memory is registered with it, unregistered
from it, or it is closed. A registration (up to a second per GPU region and session on the H100
host), or a new peer's session taking every region, so never holds up the revocation of another
peer's session: the write fence waits at most for one call on the session it closes.
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


class _Session:
    """A peer's receive session, the regions registered with it, and its own lock."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.session_id = transport.session_id
        self.lock = threading.Lock()
        self.regions: set[int] = set()
        self.closed = False

    def add(self, addr: int, length: int) -> None:
        with self.lock:
            self._add(addr, length)

    def _add(self, addr: int, length: int) -> None:  # self.lock held
        if not self.closed and addr not in self.regions:
            self.transport.register(addr, length)
            self.regions.add(addr)

    def remove(self, addr: int) -> None:
        with self.lock:
            if addr in self.regions and not self.closed:
                self.regions.discard(addr)
                self.transport.unregister(addr)

    def close(self) -> None:
        """Unregister everything and close: after any call on it under way, never during one."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.regions.clear()
            self.transport.close()


class SessionedTransport:
    """A :class:`~kvd.transfer.base.Transport` with one revocable receive session per peer."""

    def __init__(self, main: Transport, open_session: Callable[[], Transport]) -> None:
        self.main = main
        self.session_id = main.session_id  # peers are told their receive session instead
        self.protocol = main.protocol
        self.devices = main.devices
        self._open_session = open_session
        self._regions: dict[int, int] = {}
        self._sessions: dict[str, _Session] = {}  # replaced whole under _lock, read freely
        self._retired: list[_Session] = []  # revoked, still closing (under _lock)
        self._lock = threading.Lock()  # the tables only: never held across a transport call
        self._opening: dict[str, asyncio.Task[_Session]] = {}
        self._revoking: dict[str, asyncio.Task[None]] = {}
        self.revocations = 0

    # --- the Transport surface (writes go out through the main transport) -----------------------
    def register(self, addr: int, length: int) -> None:
        """Register with the main transport and every session (each under its own lock); a
        session opened meanwhile takes the region itself. On failure nothing stays registered."""
        self.main.register(addr, length)
        with self._lock:
            self._regions[addr] = length
            sessions = list(self._sessions.values())
        try:
            for session in sessions:
                session.add(addr, length)
        except BaseException:
            # A region left registered after its memory is unmapped would let a peer write into
            # whatever is mapped there next.
            self.unregister(addr)
            raise

    def unregister(self, addr: int) -> None:
        """Unregister everywhere, revoked sessions still closing included: once this returns, no
        session can write into the region (its memory may be unmapped next)."""
        with self._lock:
            self._regions.pop(addr, None)
            sessions = [*self._sessions.values(), *self._retired]
        for session in sessions:
            session.remove(addr)
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
            closing: list[_Session | Transport] = [*self._sessions.values(), *self._retired, self.main]
            self._sessions, self._retired = {}, []
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

    async def _open(self, peer: str) -> _Session:
        loop = asyncio.get_running_loop()
        try:
            session = _Session(await loop.run_in_executor(None, self._open_session))
            await loop.run_in_executor(None, self._fill, peer, session)
        finally:
            self._opening.pop(peer, None)
        log.info("receive_session_opened", peer=peer, session=session.session_id)
        return session

    def _fill(self, peer: str, session: _Session) -> None:
        """Add a new session and register every region with it. Its own lock is held from before
        it is added until every region is in, so a region unregistered meanwhile waits for it and
        is then taken out again, and one registered meanwhile is added once (by whichever comes
        second); other sessions, registrations elsewhere and revocations go on meanwhile."""
        with session.lock:
            with self._lock:
                self._sessions = {**self._sessions, peer: session}
                regions = dict(self._regions)
            try:
                for addr, length in regions.items():
                    session._add(addr, length)
            except BaseException:
                with self._lock:
                    self._sessions = {p: t for p, t in self._sessions.items() if t is not session}
                session.closed = True
                session.transport.close()
                raise

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
            session = self._withdraw(peer)
            if session is None:
                return
            self.revocations += 1
            log.warning("receive_session_revoked", peer=peer, session=session.session_id, reason=reason)
            try:
                # Off the loop: a registration with this session may be under way (a GPU region:
                # up to a second); the close comes right after it.
                await loop.run_in_executor(None, session.close)
            except TransportError as exc:  # closing failed: the memory is unregistered all the same
                log.error("receive_session_close_failed", peer=peer, error=str(exc))
            finally:
                with self._lock:
                    self._retired = [t for t in self._retired if t is not session]
        finally:
            self._revoking.pop(peer, None)

    def _withdraw(self, peer: str) -> _Session | None:
        with self._lock:  # the tables only: never waits for a transport call
            session = self._sessions.get(peer)
            if session is not None:
                self._sessions = {p: t for p, t in self._sessions.items() if p != peer}
                self._retired = [*self._retired, session]
            return session

    def sessions(self) -> dict[str, str]:
        return {peer: s.session_id for peer, s in self._sessions.items()}


__all__ = ["SessionedTransport"]
