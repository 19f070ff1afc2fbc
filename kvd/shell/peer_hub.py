"""Daemon-to-daemon messaging over ZMQ: one ROUTER to receive, one DEALER per peer to send.

Every peer message is one protocol message (see :mod:`kvd.wire`) and is one-way: a
reply is a separate message back to the sender's advertised address. The hub stamps
this daemon's ``src`` and ``token`` on every message it sends, so no call site repeats
them. Garbage, a wrong token or a message that fails its handler is counted and
logged, and the receive loop carries on. Liveness: any message from a peer counts as
a sign of life; heartbeats go to every peer with rooms in flight, and a peer silent
for ``heartbeat_misses`` intervals is declared dead (its rooms fail).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from typing import Any, Protocol

import structlog
import zmq
import zmq.asyncio

from kvd.core.config import Config
from kvd.sides.tasks import TaskOwner
from kvd.wire import peer as wp
from kvd.wire.codec import Message, ProtocolError, decode

log = structlog.get_logger("kvd.peers")


class PeerHandler(Protocol):
    """What the hub calls: the daemon's routing, its dead-peer reaction and its error counter."""

    def on_peer_message(self, msg: Message) -> None: ...
    def peer_dead(self, peer: str) -> None: ...
    def count_error(self, kind: str) -> None: ...
    def now(self) -> float: ...


class PeerHub:
    def __init__(self, config: Config, handler: PeerHandler, tasks: TaskOwner) -> None:
        self.config = config
        self.handler = handler
        self.tasks = tasks
        self.token = config.auth_token
        self.address = ""
        self.ctx = zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self.last_seen: dict[str, float] = {}
        self._watch_since: dict[str, float] = {}
        self.dead: set[str] = set()
        self._nonce = itertools.count(1)

    async def start(self) -> None:
        c = self.config
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        if c.peer_port:
            router.bind(f"tcp://{c.hostname}:{c.peer_port}")
            port = c.peer_port
        else:
            port = router.bind_to_random_port(f"tcp://{c.hostname}")
        self._router = router
        self.address = f"tcp://{c.hostname}:{port}"
        self.tasks.spawn(self._receive_loop(), "peer-receive")

    async def stop(self) -> None:
        for sock in self._dealers.values():
            sock.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)

    def send(self, addr: str, msg: Message) -> None:
        """Stamp and queue one message to a peer; never blocks the loop (a full queue drops and counts)."""
        if isinstance(msg, wp.PeerMessage):
            msg = wp.stamped(msg, self.address, self.token)
        if addr == self.address:
            # A daemon can be its own peer (prefill and decode engines on one node).
            asyncio.get_running_loop().call_soon(self._handle, msg)
            return
        sock = self._dealers.get(addr)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.IMMEDIATE, 0)
            sock.connect(addr)
            self._dealers[addr] = sock
        try:
            sock.send(msg.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.handler.count_error("peer_backpressure")
            log.warning("peer_queue_full", peer=addr, msg=type(msg).__name__)

    async def _receive_loop(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                self.handler.count_error("protocol")
                log.warning("peer_bad_frames", frames=len(frames))
                continue
            try:
                msg = decode(frames[1])
            except ProtocolError as exc:
                self.handler.count_error("protocol")
                log.warning("peer_protocol_error", error=str(exc))
                continue
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        token = getattr(msg, "token", "")
        # Bytes, not str: compare_digest refuses non-ASCII str, and a peer chooses this value.
        if self.token and not hmac.compare_digest(str(token).encode(), self.token.encode()):
            self.handler.count_error("auth")
            log.warning("peer_auth_failed", src=getattr(msg, "src", "?"), msg=type(msg).__name__)
            return
        src = getattr(msg, "src", "")
        if src:
            self.last_seen[src] = self.handler.now()
            if src in self.dead:
                self.dead.discard(src)
                log.info("peer_alive_again", peer=src)
        try:
            if isinstance(msg, wp.Heartbeat):
                self.send(msg.src, wp.HeartbeatAck(nonce=msg.nonce))
            elif not isinstance(msg, wp.HeartbeatAck):
                self.handler.on_peer_message(msg)
        except Exception as exc:  # one bad message must never stop the loop
            self.handler.count_error("peer_handler")
            log.exception("peer_handler_error", msg=type(msg).__name__, src=src, error=str(exc))

    def heartbeat(self, peers: set[str], now: float) -> None:
        """Ping peers with rooms in flight; declare dead those silent past the limit."""
        peers = peers - {self.address}
        limit = self.config.heartbeat_interval_s * self.config.heartbeat_misses
        for peer in peers:
            since = self._watch_since.setdefault(peer, now)
            seen = max(self.last_seen.get(peer, since), since)
            if now - seen > limit and peer not in self.dead:
                self.dead.add(peer)
                self.handler.peer_dead(peer)
            self.send(peer, wp.Heartbeat(nonce=next(self._nonce)))
        for peer in list(self._watch_since):
            if peer not in peers:
                del self._watch_since[peer]

    def snapshot(self, rooms: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self.handler.now()
        out = []
        names = set(self.last_seen) | set(self._dealers)
        for peer in sorted(names):
            mine = [r for r in rooms if peer in str(r.get("peer", ""))]
            out.append({"peer": peer, "state": "dead" if peer in self.dead else "alive",
                        "rooms": len(mine), "bytes": sum(r.get("bytes_done", 0) for r in mine),
                        "last_seen_s": round(now - self.last_seen[peer], 2) if peer in self.last_seen else None})
        return out


__all__ = ["PeerHub", "PeerHandler"]
