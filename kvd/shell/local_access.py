"""Who may use the local socket, and whose pools, rooms and descriptors are whose.

Every engine connection (and every fd hand-over) is identified by the kernel (SO_PEERCRED),
never by what the engine says. An optional allow-list of uids and gids (``socket.allow_uids``,
``socket.allow_gids``; primary or supplementary groups) is checked on every connection on top
of the socket's mode and group. A connection's pools and rooms belong to it (the daemon checks
the connection on every call); the status an engine reads shows only the pools and rooms of its
own uid, unless it is root or kvd's own user (operators, ``kvctl status``). A host pool's
descriptor handed over on the fd socket is redeemed only by a connection of the same uid. An
engine name whose last rank went away stays its uid's for ``socket.engine_name_grace_s`` (an
engine mid-restart is not another user's to take over).

This module never trusts an id an engine sends and never opens a file on an engine's behalf.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

import structlog

from kvd.mem.fdpool import ReceivedFd
from kvd.mem.opened import PoolMemoryError
from kvd.wire import fdmsg

log = structlog.get_logger("kvd.trust")

#: Seconds a handed-over descriptor waits for its RegisterPool.
TICKET_S = 30.0
#: Descriptors waiting at once, per uid and in all.
TICKETS_PER_UID = 64
TICKETS_MAX = 1024
#: Engine names remembered for their grace period at once (the oldest is forgotten first).
NAMES_KEPT = 65_536


@dataclass(frozen=True)
class Credentials:
    """A local peer as the kernel reports it."""

    pid: int
    uid: int
    gid: int


UNKNOWN = Credentials(-1, -1, -1)


def peer_credentials(sock: socket.socket) -> Credentials:
    """SO_PEERCRED of a connected Unix socket (UNKNOWN when the kernel says nothing)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return UNKNOWN
    pid, uid, gid = struct.unpack("3i", raw)
    return Credentials(pid, uid, gid)


def _ids(text: str) -> frozenset[int]:
    return frozenset(int(x) for x in text.split(",") if x.strip())


def groups_of(creds: Credentials) -> set[int]:
    """The primary gid and the uid's supplementary groups (from the user database)."""
    out = {creds.gid}
    with contextlib.suppress(KeyError, OSError):
        out.update(os.getgrouplist(pwd.getpwuid(creds.uid).pw_name, creds.gid))
    return out


class LocalAccess:
    """The allow-list, the owner of each connection, and the descriptors waiting for a pool."""

    def __init__(self, allow_uids: str = "", allow_gids: str = "", name_grace_s: float = 300.0) -> None:
        self.allow_uids = _ids(allow_uids)
        self.allow_gids = _ids(allow_gids)
        self._conns: dict[int, Credentials] = {}
        self._tickets: dict[str, tuple[ReceivedFd, float]] = {}
        self.name_grace_s = name_grace_s
        # (engine id, role) -> (uid that held it last, when its last rank went away)
        self._names: dict[tuple[str, str], tuple[int, float]] = {}
        self.me = os.geteuid()

    @classmethod
    def from_config(cls, config: Any) -> LocalAccess:
        return cls(config.socket_allow_uids, config.socket_allow_gids, config.socket_engine_name_grace_s)

    # --- connections ----------------------------------------------------------------------------
    def refusal(self, creds: Credentials) -> str:
        """"" if ``creds`` may use the socket; else why not."""
        if not self.allow_uids and not self.allow_gids:
            return ""
        if creds.uid in (0, self.me) or creds.uid in self.allow_uids:
            return ""
        if self.allow_gids and groups_of(creds) & self.allow_gids:
            return ""
        return f"uid {creds.uid} is not in socket.allow_uids / socket.allow_gids"

    def connected(self, conn_id: int, creds: Credentials) -> None:
        self._conns[conn_id] = creds

    def gone(self, conn_id: int) -> None:
        self._conns.pop(conn_id, None)

    def creds(self, conn_id: int) -> Credentials:
        return self._conns.get(conn_id, UNKNOWN)

    def is_operator(self, conn_id: int) -> bool:
        """Root or kvd's own user: sees every pool and room in status."""
        uid = self.creds(conn_id).uid
        return uid in (0, self.me)

    # --- engine names -------------------------------------------------------------------------
    def engine_left(self, engine: tuple[str, str], uid: int, now: float) -> None:
        """The last rank of ``engine`` (id, role) went away: the name stays ``uid``'s for the grace."""
        self._names.pop(engine, None)
        self._names[engine] = (uid, now)
        while self._names:  # oldest first: expired ones, and past NAMES_KEPT the oldest anyway
            oldest = next(iter(self._names))
            if len(self._names) <= NAMES_KEPT and now - self._names[oldest][1] < self.name_grace_s:
                break
            del self._names[oldest]

    def engine_claim_refusal(self, engine: tuple[str, str], uid: int, now: float) -> str:
        """"" if ``uid`` may register a rank of ``engine`` (no rank of it registered); else why not."""
        held = self._names.get(engine)
        if held is None or now - held[1] >= self.name_grace_s:
            self._names.pop(engine, None)
            return ""
        if held[0] == uid:
            return ""
        return (f"{engine[1]} engine {engine[0]!r} belonged to another user until "
                f"{now - held[1]:.0f} s ago (socket.engine_name_grace_s {self.name_grace_s:g})")

    # --- handed-over descriptors ------------------------------------------------------------------
    def deposit(self, fd: int, creds: Credentials, now: float) -> str:
        """Keep a received descriptor for TICKET_S; its ticket. Raises PoolMemoryError when
        this uid (or everyone) has too many waiting; the descriptor is then closed."""
        self.expire(now)
        mine = sum(1 for held, _ in self._tickets.values() if held.uid == creds.uid)
        if mine >= TICKETS_PER_UID or len(self._tickets) >= TICKETS_MAX:
            os.close(fd)
            raise PoolMemoryError(f"too many descriptors waiting for RegisterPool (uid {creds.uid}: {mine})")
        ticket = secrets.token_hex(fdmsg.TICKET_CHARS // 2)
        self._tickets[ticket] = (ReceivedFd(fd, creds.uid), now + TICKET_S)
        return ticket

    def redeem(self, ticket: object, conn_id: int) -> ReceivedFd:
        """The descriptor behind ``ticket``, for a connection of the uid that handed it over."""
        if not fdmsg.is_ticket(ticket):
            raise PoolMemoryError("an fd pool names the ticket its descriptor was handed over with")
        assert isinstance(ticket, str)
        entry = self._tickets.get(ticket)
        uid = self.creds(conn_id).uid
        if entry is None or entry[0].uid != uid:
            # The same answer whether it never existed or is another user's: nothing to probe.
            raise PoolMemoryError("no descriptor was handed over under this ticket by this user "
                                  "(or it expired: register within "
                                  f"{TICKET_S:.0f} s of handing it over)")
        del self._tickets[ticket]
        return entry[0]

    def expire(self, now: float) -> None:
        for ticket in [t for t, (_, deadline) in self._tickets.items() if deadline < now]:
            held, _ = self._tickets.pop(ticket)
            held.close()

    def close(self) -> None:
        for held, _ in self._tickets.values():
            held.close()
        self._tickets.clear()

    def waiting(self) -> int:
        return len(self._tickets)

    # --- what an engine may read ------------------------------------------------------------------
    def filter_status(self, status: dict[str, Any], conn_id: int,
                      owned: list[tuple[int, str, int, str]]) -> dict[str, Any]:
        """``status`` as an engine of another uid may read it: only the pools and rooms of its
        own uid. ``owned`` = (pool_id, engine_id, rank, role) of every pool of that uid."""
        if self.is_operator(conn_id):
            return status
        pool_ids = {p[0] for p in owned}
        daemon = dict(status.get("daemon", {}))
        daemon["pools"] = [p for p in daemon.get("pools", []) if p.get("pool_id") in pool_ids]
        # By pool id: an engine names itself, and two users' engines may share a name.
        rooms = [r for r in status.get("rooms", []) if r.get("pool_id") in pool_ids]
        return {**status, "daemon": daemon, "rooms": rooms, "peers": [],
                "visibility": f"own pools and rooms (uid {self.creds(conn_id).uid})"}


__all__ = ["Credentials", "LocalAccess", "TICKET_S", "UNKNOWN", "groups_of", "peer_credentials"]
