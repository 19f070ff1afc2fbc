"""What an authenticated peer may speak for: its own engines, its own pools, its own rooms.

The peer hub has already bound a message's ``src`` to the key it came with
(:mod:`kvd.shell.peer_auth`); this gate runs next, before the message is routed, and refuses
(counted, logged, nothing changed) a message in which a peer speaks for someone else:

- ``RankAnnounce`` for a prefill rank another live daemon (or this one) serves: the directory
  entry of a room cannot be hijacked. An entry changes hands once its daemon withdrew it,
  restarted, was declared dead or was forgotten.
- ``PoolAnnounce`` of a pool key outside the announcer's namespace (``<src>#...``), of a key
  another daemon announced, or naming a Mooncake session on another host than the announcer's.
- ``TransferRequest`` into a pool the peer did not announce itself; ``AbortTransfer`` of a
  transfer another daemon asked for.

Prefill -> decode replies (statuses, chunk reports, abort acks) and staging grants and outcomes
are already matched to the daemon a room expects by the room sides.

This module never changes state and never raises into the receive loop: it only answers
"refused, and why" or "fine".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from kvd.mem.pools import RemotePool
from kvd.wire import peer as wp
from kvd.wire.codec import Message

log = structlog.get_logger("kvd.trust")


class _Pools(Protocol):
    def remote(self, pool_key: str) -> RemotePool | None: ...


def host_of(address: str) -> str:
    """``tcp://host:port`` or ``host:port`` -> ``host`` (brackets of IPv6 kept)."""
    text = address.removeprefix("tcp://")
    host, sep, _ = text.rpartition(":")
    return host if sep else text


class PeerGate:
    """Ownership checks of peer messages; see the module docstring."""

    def __init__(self, address: Callable[[], str], pools: _Pools,
                 rank_owner: Callable[[str, int], str | None],
                 transfer_src: Callable[[int, int], Iterable[str]],
                 peer_alive: Callable[[str], bool], count: Callable[[str], None]) -> None:
        self._address = address
        self._pools = pools
        self._rank_owner = rank_owner  # (engine, rank) -> daemon serving it now (None: nobody)
        self._transfer_src = transfer_src  # (transfer_id, sender_rank) -> srcs of requests in flight
        self._peer_alive = peer_alive
        self._count = count
        self.refused = 0

    def check(self, msg: Message) -> str:
        """"" = the peer speaks for itself; else why it does not."""
        if not isinstance(msg, wp.PeerMessage):
            return ""
        src = msg.src
        try:
            if isinstance(msg, wp.RankAnnounce):
                return self._rank(msg)
            if isinstance(msg, wp.PoolAnnounce):
                return self._pool_announce(msg)
            if isinstance(msg, wp.TransferRequest):
                return self._own_pool(src, msg.pool_key)
            if isinstance(msg, wp.AbortTransfer):
                return self._own_pool(src, msg.pool_key) or self._own_transfer(src, msg.transfer_id,
                                                                              msg.sender_rank)
        except (AttributeError, TypeError, ValueError) as exc:  # malformed content: the peer's fault
            return f"malformed {type(msg).__name__}: {exc}"
        return ""

    def admit(self, msg: Message) -> bool:
        """True to route ``msg``; False when refused (counted as ``peer_ownership`` and logged)."""
        problem = self.check(msg)
        if not problem:
            return True
        self.refused += 1
        self._count("peer_ownership")
        log.warning("peer_message_refused", msg=type(msg).__name__, src=str(getattr(msg, "src", ""))[:80],
                    reason=problem[:300])
        return False

    # --- rules ----------------------------------------------------------------------------------
    def _rank(self, msg: wp.RankAnnounce) -> str:
        layout: Any = msg.layout
        engine = layout.get("engine_id") if isinstance(layout, dict) else None
        rank = layout.get("tp_rank") if isinstance(layout, dict) else None
        if not isinstance(engine, str) or not isinstance(rank, int):
            return ""  # the directory refuses the layout itself, with its own message
        owner = self._rank_owner(engine, rank)
        if owner is None or owner == msg.src:
            return ""
        if msg.withdraw:
            return f"{msg.src} withdraws prefill rank {engine}/{rank}, which {owner} serves"
        if owner != self._address() and not self._peer_alive(owner):
            return ""  # its daemon is dead or forgotten: the rank may move
        return f"{msg.src} announces prefill rank {engine}/{rank}, which {owner} serves"

    def _pool_announce(self, msg: wp.PoolAnnounce) -> str:
        problem = self._namespace(msg.src, msg.pool_key)
        if problem:
            return problem
        known = self._pools.remote(msg.pool_key)
        if known is not None and known.daemon != msg.src:
            return f"pool {msg.pool_key} was announced by {known.daemon}"
        if host_of(msg.session_id) != host_of(msg.src):
            return (f"{msg.src} names Mooncake session {msg.session_id[:80]!r} on another host: a peer "
                    "may announce only its own memory")
        return ""

    def _own_pool(self, src: str, pool_key: str) -> str:
        problem = self._namespace(src, pool_key)
        if problem:
            return problem
        known = self._pools.remote(pool_key)
        if known is not None and known.daemon != src:
            return f"{src} asks for a transfer into pool {pool_key}, announced by {known.daemon}"
        return ""

    def _own_transfer(self, src: str, transfer_id: int, sender_rank: int) -> str:
        others = sorted(set(self._transfer_src(transfer_id, sender_rank)) - {src})
        if others:
            return f"{src} aborts transfer {transfer_id} of {others[0]}"
        return ""

    @staticmethod
    def _namespace(src: str, pool_key: str) -> str:
        if not isinstance(pool_key, str) or not pool_key.startswith(src + "#"):
            return f"pool key {str(pool_key)[:80]!r} is not in {src}'s namespace ({src}#...)"
        return ""


__all__ = ["PeerGate", "host_of"]
