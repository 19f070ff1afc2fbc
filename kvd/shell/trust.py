"""The daemon's trust boundary in one place: peer keys, ownership gate, local users, fd hand-over.

:class:`Trust` is what :mod:`kvd.shell.daemon` holds: it loads the keys at start (refusing to
start without them unless ``peer.insecure``), gives the peer hub its :class:`PeerAuth`, gates
peer messages by ownership (:class:`PeerGate`), gives the engine server its
:class:`LocalAccess`, serves the fd hand-over socket, turns an engine's ``fd`` memory map into
the descriptor it handed over, and says in status what is and is not protected.

This module never decides a room's fate and never opens engine memory by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from kvd.core.config import Config
from kvd.mem.opened import PoolMemoryError
from kvd.shell.fd_inbox import FdInbox
from kvd.shell.local_access import LocalAccess
from kvd.shell.peer_auth import PeerAuth, TrustError
from kvd.shell.peer_gate import PeerGate

log = structlog.get_logger("kvd.trust")

#: Seconds between sweeps of expired fd tickets.
SWEEP_S = 5.0
#: What Mooncake exposes, for status (see notes/security-model.md).
MOONCAKE_EXPOSURE = ("Mooncake's handshake (RPC) port and TCP data port listen on all addresses with no "
                     "authentication, whatever node.hostname says: firewall them to the data network")


class Trust:
    """See the module docstring. ``peer`` is set by :meth:`load` (at start)."""

    def __init__(self, config: Config, count: Callable[[str], None],
                 now: Callable[[], float]) -> None:
        self.config = config
        self._count = count
        self._now = now
        self.peer: PeerAuth | None = None
        self.access = LocalAccess.from_config(config)
        self.inbox = FdInbox(config.socket_path, config.socket_mode, config.socket_group, self.access,
                             count, now)
        self.gate: PeerGate | None = None

    def load(self) -> PeerAuth:
        """Keys and authorized peers (TrustError: no key and not ``peer.insecure``)."""
        self.peer = PeerAuth.from_config(self.config, self._count)
        if not self.peer.secure:
            log.warning("peer_insecure", hint="peer.insecure = true: peers are neither authenticated nor "
                                              "encrypted; any host reaching the peer port can read and write "
                                              "KV cache. Create keys with `kvd keygen` for production")
        else:
            assert self.peer.ring is not None
            log.info("peer_keys_loaded", public_key=self.peer.public.decode("ascii"),
                     authorized=len(self.peer.ring), directory=self.peer.ring.directory)
            if not len(self.peer.ring):
                log.warning("no_authorized_peers", directory=self.peer.ring.directory,
                            hint="only engines of this node can use each other until peers' keys are added")
        log.warning("mooncake_exposed", detail=MOONCAKE_EXPOSURE)
        return self.peer

    async def start_inbox(self, spawn: Callable[..., Any]) -> None:
        await self.inbox.start()
        spawn(self.inbox.serve(), "fd-inbox")
        spawn(self._sweep(), "fd-tickets")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.access.expire(self._now())

    def resolve_memory(self, conn_id: int, memory: Any) -> Any:
        """An engine's ``{"kind": "fd", "ticket": ...}`` -> the same map with the descriptor it
        handed over (a :class:`~kvd.mem.fdpool.ReceivedFd`, never a number from the wire)."""
        if not isinstance(memory, dict):
            return memory
        if "fd" in memory:
            raise PoolMemoryError("a memory map may not name a descriptor number: hand the descriptor "
                                  "over on the fd socket and name its ticket")
        if memory.get("kind") != "fd":
            return memory
        held = self.access.redeem(memory.get("ticket"), conn_id)
        return {**{k: v for k, v in memory.items() if k != "ticket"}, "fd": held}

    def describe(self) -> dict[str, Any]:
        peer = self.peer.describe() if self.peer is not None else {"peer_auth": "not started"}
        return {**peer, "socket_allow_uids": sorted(self.access.allow_uids),
                "socket_allow_gids": sorted(self.access.allow_gids), "fd_tickets_waiting": self.access.waiting(),
                "peer_messages_refused": self.gate.refused if self.gate is not None else 0,
                "mooncake": MOONCAKE_EXPOSURE}

    def stop(self) -> None:
        self.inbox.stop()
        self.access.close()
        if self.peer is not None:
            self.peer.stop()


def trust_gate(daemon: Any) -> PeerGate:
    """The ownership gate over a daemon's directory, pools, sender rooms and peer table."""

    def rank_owner(engine: str, rank: int) -> str | None:
        entry = daemon.directory.ranks.get(engine, {}).get(rank)
        return entry[1] if entry is not None else None

    return PeerGate(lambda: daemon.address, daemon.registry, rank_owner, daemon.senders.request_srcs,
                    lambda peer: daemon.peers.alive(peer),
                    daemon.count_error)


__all__ = ["MOONCAKE_EXPOSURE", "Trust", "TrustError", "trust_gate"]
