"""Daemon-to-daemon messaging over ZMQ: one ROUTER to receive, one DEALER per peer to send.

Every peer message is one protocol message (see :mod:`kvd.wire`) and is one-way: a
reply is a separate message back to the sender's advertised address. The hub stamps
this daemon's ``src``, ``token`` and ``incarnation`` on every message it sends, so no call
site repeats them.

Bounded and supervised. The ROUTER refuses a message over ``peer.max_message_bytes`` before
buffering it (``zmq.MAXMSGSIZE``), caps what it queues per connection, and drops connections
that stop answering ZMTP pings (a peer stuck mid-message included). Peers, and with them DEALER
sockets (descriptors), are at most ``peer.max_peers``; the longest-idle one is reclaimed, and
one with no rooms and no traffic for ``peer.idle_s`` is forgotten. Garbage, a wrong token, an
unusable ``src`` or a message of an older incarnation is counted and logged (no traceback: it
is the peer's fault, not ours); a handler that raises is a bug, logged with its traceback and
counted; the receive loop goes on either way. ``send`` never raises.

Liveness: any message from a peer counts as a sign of life; heartbeats go to every peer with
rooms in flight, and a peer silent for ``heartbeat_misses`` intervals is declared dead (its
rooms fail). A peer whose messages carry a new incarnation was restarted: the restart hooks
drop what its old incarnation told us and fail the rooms it had taken on.

This module never decides a room's fate and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import structlog
import zmq
import zmq.asyncio

from kvd.core.config import Config
from kvd.obs.sdnotify import Watchdog
from kvd.shell.peer_auth import LOCAL, PeerAuth, token_matches, user_id_of
from kvd.sides.tasks import TaskOwner
from kvd.wire import peer as wp
from kvd.wire.codec import Message, ProtocolError, decode

log = structlog.get_logger("kvd.peers")

_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):([0-9]{1,5})")
_MAX_ADDRESS = 256
#: Seconds the receive loop waits for a message before it reports a (idle) pass anyway.
POLL_S = 1.0
#: Messages the ROUTER queues per peer connection before it stops reading from it.
ROUTER_HWM = 10_000
#: Peer messages read per wake-up of the receive loop before it yields to the event loop.
RECEIVE_BATCH = 256
#: Old incarnations remembered per peer (their late messages are dropped).
RETIRED_KEPT = 4


class PeerAddressError(ValueError):
    """A peer address kvd cannot connect to (not ``tcp://host:port``)."""


def check_peer_address(addr: object) -> str:
    """``addr`` if it is a usable peer address ``tcp://host:port`` (port 1-65535), else
    PeerAddressError saying what is wrong with it."""
    if not isinstance(addr, str) or not addr:
        raise PeerAddressError(f"peer address must be a non-empty string like tcp://host:port, got {addr!r}")
    if len(addr) > _MAX_ADDRESS:
        raise PeerAddressError(f"peer address is {len(addr)} characters long (most {_MAX_ADDRESS})")
    match = _ADDRESS.fullmatch(addr)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise PeerAddressError(f"peer address {addr[:80]!r} must look like tcp://host:port (port 1-65535)")
    return addr


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
        self.incarnation = ""  # this daemon's; set before start() (the daemon's boot id)
        self.ctx = zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: OrderedDict[str, zmq.asyncio.Socket] = OrderedDict()  # least recently used first
        self._plain: dict[str, zmq.Socket[bytes]] = {}  # each DEALER without zmq.asyncio's futures
        self._dealer_keys: dict[str, bytes | None] = {}  # the server key each DEALER was made with
        self._last_sent: dict[str, float] = {}
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self._watch_since: dict[str, float] = {}
        self.dead: set[str] = set()
        self.incarnations: dict[str, str] = {}
        self._retired: dict[str, list[str]] = {}
        self._active: set[str] = set()
        self._nonce = itertools.count(1)
        #: Called with a peer's address when it shows a new incarnation (it was restarted).
        self.restart_hooks: list[Callable[[str], None]] = []
        self.watchdog: Watchdog | None = None
        #: CurveZMQ keys and the src binding (kvd.shell.peer_auth); None: the token check only.
        self.auth: PeerAuth | None = None

    async def start(self) -> None:
        c = self.config
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, c.peer_max_message_bytes)  # checked before buffering
        router.setsockopt(zmq.RCVHWM, ROUTER_HWM)
        # ZMTP pings: a connection that stops answering (dead, or stuck mid-message) is dropped.
        ping_ms = max(1000, int(c.heartbeat_interval_s * 1000))
        router.setsockopt(zmq.HEARTBEAT_IVL, ping_ms)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, ping_ms * max(3, c.heartbeat_misses))
        router.setsockopt(zmq.HANDSHAKE_IVL, 10_000)
        if self.auth is not None:  # CURVE server + ZAP allow-list, set before bind
            self.auth.start(self.ctx)
            self.auth.setup_router(router)
        if c.peer_port:
            router.bind(f"tcp://{c.hostname}:{c.peer_port}")
            port = c.peer_port
        else:
            port = router.bind_to_random_port(f"tcp://{c.hostname}")
        self._router = router
        self.address = f"tcp://{c.hostname}:{port}"
        if self.watchdog is not None:
            self.watchdog.watch("peer-receive", POLL_S * 5, self.handler.now())
        self.tasks.spawn(self._receive_loop(), "peer-receive", critical=True)

    async def stop(self) -> None:
        for sock in self._dealers.values():
            sock.close(linger=0)
        self._dealers.clear()
        self._plain.clear()
        self._dealer_keys.clear()
        if self._router is not None:
            self._router.close(linger=0)

    # --- sending ------------------------------------------------------------------------------
    def send(self, addr: str, msg: Message) -> bool:
        """Stamp and queue one message to a peer; never blocks the loop and never raises.
        False (counted and logged) when it cannot be queued: a bad address, no descriptor left,
        a full queue."""
        if isinstance(msg, wp.PeerMessage):
            msg = wp.stamped(msg, self.address, self.token, self.incarnation)
        if addr == self.address:
            # A daemon can be its own peer (prefill and decode engines on one node).
            asyncio.get_running_loop().call_soon(self._handle, msg)
            return True
        sock = self._dealer(addr, type(msg).__name__)
        if sock is None:
            return False
        try:
            # The plain socket's send: NOBLOCK never waits, so zmq.asyncio's future is pure cost.
            # NOBLOCK never waits: zmq.asyncio's future per send would be pure cost (issue 15).
            self._plain[addr].send(msg.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.handler.count_error("peer_backpressure")
            log.warning("peer_queue_full", peer=addr, msg=type(msg).__name__)
            return False
        except zmq.ZMQError as exc:
            self.handler.count_error("peer_send")
            log.warning("peer_send_failed", peer=addr, msg=type(msg).__name__, error=str(exc))
            self._close(addr)
            return False
        self._last_sent[addr] = self.handler.now()
        return True

    def _dealer(self, addr: str, what: str) -> zmq.asyncio.Socket | None:
        sock = self._dealers.get(addr)
        if sock is not None:
            if self.auth is None or self.auth.server_key(addr) == self._dealer_keys.get(addr):
                self._dealers.move_to_end(addr)
                return sock
            # The peer's key was replaced or removed since this socket was made: a socket that
            # still expects the old key would fail every handshake with a re-keyed peer, and go on
            # talking to a revoked one. Made again below (or refused, with no key).
            self.handler.count_error("peer_key_changed")
            log.warning("peer_key_changed", peer=addr, msg=what)
            self._close(addr)
        try:
            check_peer_address(addr)
        except PeerAddressError as exc:
            self.handler.count_error("peer_address")
            log.warning("peer_address_unusable", msg=what, error=str(exc))
            return None
        while len(self._dealers) >= self.config.peer_max_peers:
            self._evict_one()
        try:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.IMMEDIATE, 0)
            problem = self.auth.setup_dealer(sock, addr) if self.auth is not None else ""
            if problem:  # no key for this address: never talk to it unauthenticated
                sock.close(linger=0)
                self.handler.count_error("peer_key_unknown")
                log.warning("peer_key_unknown", peer=addr, msg=what, error=problem)
                return None
            sock.connect(addr)
        except zmq.ZMQError as exc:  # EMFILE, or an address zmq still refuses
            if sock is not None:
                sock.close(linger=0)
            self.handler.count_error("peer_socket")
            log.warning("peer_socket_failed", peer=addr, msg=what, error=str(exc))
            return None
        self._dealers[addr] = sock
        self._plain[addr] = zmq.Socket.shadow(sock.underlying)
        if self.auth is not None:
            self._dealer_keys[addr] = self.auth.server_key(addr)
        return sock

    def _evict_one(self) -> None:
        """Close the least recently used DEALER, preferring a peer with no rooms in flight."""
        victim = next((a for a in self._dealers if a not in self._active), None) or next(iter(self._dealers))
        self.handler.count_error("peer_evicted")
        log.info("peer_socket_reclaimed", peer=victim, reason="max_peers")
        self._close(victim)

    def _close(self, addr: str) -> None:
        sock = self._dealers.pop(addr, None)
        self._plain.pop(addr, None)
        self._dealer_keys.pop(addr, None)
        self._last_sent.pop(addr, None)
        if sock is not None:
            sock.close(linger=0)

    # --- receiving ------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        assert self._router is not None
        router = self._router
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(router.underlying)  # the same socket, without zmq.asyncio's futures
        while True:
            # Poll with a timeout so that an idle loop still reports passes to the watchdog.
            if await router.poll(int(POLL_S * 1000)):
                with self.tasks.guard("peer-receive"):
                    # Drain what is queued with plain non-blocking reads (one wake-up, not two
                    # futures per message), bounded so the loop's other work is not starved.
                    for _ in range(RECEIVE_BATCH):
                        try:
                            frames = plain.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive([f.bytes for f in frames], user_id_of(frames[-1]))
            if self.watchdog is not None and self.tasks.healthy("peer-receive"):
                self.watchdog.beat("peer-receive", self.handler.now())

    def _receive(self, frames: list[bytes], user_id: str | None = None) -> None:
        if len(frames) != 2:
            self.handler.count_error("protocol")
            log.warning("peer_bad_frames", frames=len(frames))
            return
        try:
            msg = decode(frames[1])
        except ProtocolError as exc:
            self.handler.count_error("protocol")
            log.warning("peer_protocol_error", error=str(exc)[:200])
            return
        self._handle(msg, user_id)

    def _handle(self, msg: Message, user_id: str | None = LOCAL) -> None:
        token = getattr(msg, "token", "")
        if self.auth is not None:  # the key it came with must be allowed to speak as its src
            refused = self.auth.admit(getattr(msg, "src", ""), token, user_id)
            if not refused and user_id != LOCAL and getattr(msg, "src", "") == self.address:
                # This daemon's own messages never come over ZMQ: a key bound to its address (a
                # stale file of a node whose address it now has) must not speak as it to itself.
                refused = "peer_identity"
            if refused:
                self.handler.count_error(refused)
                log.warning("peer_auth_failed", reason=refused, src=str(getattr(msg, "src", "?"))[:80],
                            msg=type(msg).__name__)
                return
        # Bytes, not str: compare_digest refuses non-ASCII str, and a peer chooses this value.
        elif self.token and not token_matches(self.token, token):
            self.handler.count_error("auth")
            log.warning("peer_auth_failed", src=str(getattr(msg, "src", "?"))[:80], msg=type(msg).__name__)
            return
        src = getattr(msg, "src", "")
        if isinstance(msg, wp.PeerMessage):
            try:
                if src not in self.last_seen:  # checked when first seen (the hot path skips it)
                    check_peer_address(src)
            except PeerAddressError as exc:  # the peer's fault: no traceback
                self.handler.count_error("bad_peer_src")
                log.warning("peer_src_unusable", msg=type(msg).__name__, error=str(exc))
                return
            if not self._current_incarnation(src, str(getattr(msg, "incarnation", ""))):
                return
            self._seen(src)
        try:
            if isinstance(msg, wp.Heartbeat):
                self.send(src, wp.HeartbeatAck(nonce=msg.nonce))
            elif not isinstance(msg, wp.HeartbeatAck):
                self.handler.on_peer_message(msg)
        except Exception as exc:  # one bad message must never stop the loop
            self.handler.count_error("peer_handler")
            log.exception("peer_handler_error", msg=type(msg).__name__, src=src, error=str(exc))

    def _seen(self, src: str) -> None:
        self.last_seen[src] = self.handler.now()
        self.last_seen.move_to_end(src)
        if len(self.last_seen) > self.config.peer_max_peers:
            self._forget(next(iter(self.last_seen)))
        if src in self.dead:
            self.dead.discard(src)
            log.info("peer_alive_again", peer=src)

    def _current_incarnation(self, src: str, incarnation: str) -> bool:
        """False (dropped) for a message of an older incarnation; a new one retires the old and
        runs the restart hooks before the message is handled."""
        if not incarnation or src == self.address:
            return True  # an older release says nothing; our own messages are current
        known = self.incarnations.get(src)
        if known == incarnation:
            return True
        if incarnation in self._retired.get(src, ()):
            self.handler.count_error("stale_incarnation")
            log.info("peer_stale_message_dropped", peer=src, incarnation=incarnation)
            return False
        self.incarnations[src] = incarnation
        if known is None:
            return True
        retired = self._retired.setdefault(src, [])
        retired.append(known)
        del retired[:-RETIRED_KEPT]
        self.handler.count_error("peer_restarted")
        log.warning("peer_restarted", peer=src, old=known, new=incarnation)
        self._close(src)  # a fresh connection for the new process
        for hook in self.restart_hooks:  # drop its old state; fail the rooms it had taken on
            hook(src)
        self.dead.discard(src)
        return True

    def alive(self, peer: str) -> bool:
        """Heard from, neither declared dead since nor forgotten (idle past ``peer.idle_s``)."""
        return peer in self.last_seen and peer not in self.dead

    def current(self, peer: str, within: float) -> bool:
        """True if ``peer`` (in the incarnation we know) was heard from in the last ``within`` s:
        what it told us before then may be stale (it may have restarted since)."""
        if peer == self.address:
            return True
        seen = self.last_seen.get(peer)
        return seen is not None and self.handler.now() - seen <= within

    # --- liveness and reclaiming ---------------------------------------------------------------
    def heartbeat(self, peers: set[str], now: float) -> None:
        """Ping peers with rooms in flight; declare dead those silent past the limit; forget
        peers idle past ``peer.idle_s``."""
        peers = peers - {self.address}
        self._active = peers
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
        self.reclaim(now)

    def reclaim(self, now: float) -> None:
        """Close DEALERs and drop table entries of peers with no rooms and no traffic lately."""
        idle = self.config.peer_idle_s
        for peer in [p for p in self._dealers if p not in self._active]:
            last = max(self._last_sent.get(peer, now), self.last_seen.get(peer, float("-inf")))
            if now - last > idle:
                log.info("peer_socket_reclaimed", peer=peer, reason="idle")
                self._close(peer)
        for peer in [p for p, t in self.last_seen.items() if now - t > idle and p not in self._active]:
            self._forget(peer)

    def _forget(self, peer: str) -> None:
        self.last_seen.pop(peer, None)
        self.dead.discard(peer)
        self._close(peer)
        # The incarnation stays known (small): a late message of an older one is still dropped.
        if len(self.incarnations) > 4 * self.config.peer_max_peers:
            self.incarnations.pop(next(iter(self.incarnations)))

    def counts(self) -> dict[str, int]:
        return {"sockets": len(self._dealers), "known": len(self.last_seen), "dead": len(self.dead)}

    def snapshot(self, rooms: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self.handler.now()
        out = []
        names = set(self.last_seen) | set(self._dealers)
        for peer in sorted(names):
            mine = [r for r in rooms if peer in str(r.get("peer", ""))]
            out.append({"peer": peer, "state": "dead" if peer in self.dead else "alive",
                        "rooms": len(mine), "bytes": sum(r.get("bytes_done", 0) for r in mine),
                        "incarnation": self.incarnations.get(peer, ""),
                        "last_seen_s": round(now - self.last_seen[peer], 2) if peer in self.last_seen else None})
        return out


__all__ = ["PeerAddressError", "PeerHub", "PeerHandler", "check_peer_address"]
