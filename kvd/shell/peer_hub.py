"""Daemon-to-daemon messaging over ZMQ: one ROUTER to receive, one DEALER per peer to send.

Every peer message is one protocol message (see :mod:`kvd.protocol`) and is
one-way: a reply is a separate message back to the sender's advertised address.
Garbage, a wrong token or a message that fails its handler is counted and logged,
and the receive loop carries on. Liveness: any message from a peer counts as a
sign of life; heartbeats go to every peer with rooms in flight, and a peer silent
for ``heartbeat_misses`` intervals is declared dead (its rooms fail).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from typing import TYPE_CHECKING, Any

import structlog
import zmq
import zmq.asyncio

from kvd.wire import protocol as p

if TYPE_CHECKING:
    from kvd.shell.daemon import Daemon

log = structlog.get_logger("kvd.peers")


class PeerHub:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.ctx = zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self.last_seen: dict[str, float] = {}
        self._watch_since: dict[str, float] = {}
        self.dead: set[str] = set()
        self._nonce = itertools.count(1)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.d.config
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        if c.peer_port:
            router.bind(f"tcp://{c.hostname}:{c.peer_port}")
            port = c.peer_port
        else:
            port = router.bind_to_random_port(f"tcp://{c.hostname}")
        self._router = router
        self.d.address = f"tcp://{c.hostname}:{port}"
        self._task = asyncio.get_running_loop().create_task(self._receive_loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for sock in self._dealers.values():
            sock.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)

    def send(self, addr: str, msg: p.Message) -> None:
        """Queue one message to a peer; never blocks the loop (a full queue drops and counts)."""
        if addr == self.d.address:
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
            self.d.count_error("peer_backpressure")
            log.warning("peer_queue_full", peer=addr, msg=type(msg).__name__)

    async def _receive_loop(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                self.d.count_error("protocol")
                log.warning("peer_bad_frames", frames=len(frames))
                continue
            try:
                msg = p.decode(frames[1])
            except p.ProtocolError as exc:
                self.d.count_error("protocol")
                log.warning("peer_protocol_error", error=str(exc))
                continue
            self._handle(msg)

    def _handle(self, msg: p.Message) -> None:
        token = getattr(msg, "token", "")
        if self.d.token and not hmac.compare_digest(str(token), self.d.token):
            self.d.count_error("auth")
            log.warning("peer_auth_failed", src=getattr(msg, "src", "?"), msg=type(msg).__name__)
            return
        src = getattr(msg, "src", "")
        if src:
            self.last_seen[src] = self.d.now()
            if src in self.dead:
                self.dead.discard(src)
                log.info("peer_alive_again", peer=src)
        try:
            self.d.on_peer_message(msg)
        except Exception as exc:  # one bad message must never stop the loop
            self.d.count_error("peer_handler")
            log.exception("peer_handler_error", msg=type(msg).__name__, src=src, error=str(exc))

    def heartbeat(self, peers: set[str], now: float) -> None:
        """Ping peers with rooms in flight; declare dead those silent past the limit."""
        limit = self.d.config.heartbeat_interval_s * self.d.config.heartbeat_misses
        for peer in peers:
            since = self._watch_since.setdefault(peer, now)
            seen = max(self.last_seen.get(peer, since), since)
            if now - seen > limit and peer not in self.dead:
                self.dead.add(peer)
                self.d.peer_dead(peer)
            self.send(peer, p.Heartbeat(src=self.d.address, token=self.d.token, nonce=next(self._nonce)))
        for peer in list(self._watch_since):
            if peer not in peers:
                del self._watch_since[peer]

    def snapshot(self, rooms: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self.d.now()
        out = []
        names = set(self.last_seen) | set(self._dealers)
        for peer in sorted(names):
            mine = [r for r in rooms if peer in str(r.get("peer", ""))]
            out.append({"peer": peer, "state": "dead" if peer in self.dead else "alive",
                        "rooms": len(mine), "bytes": sum(r.get("bytes_done", 0) for r in mine),
                        "last_seen_s": round(now - self.last_seen[peer], 2) if peer in self.last_seen else None})
        return out
