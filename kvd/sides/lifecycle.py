"""What both room sides do the same way: transitions, failure, expiry, dead peers, events.

A side owns a dict of rooms. Every change of a room's state goes through
:meth:`SideBase.transition` or :meth:`SideBase.mark_failed` (the machine in
:mod:`kvd.core.rooms` decides; this only logs it), and the event an engine gets is
built in one place, :func:`room_event`. The two sides differ only in what they do
after a failure (:meth:`SideBase.after_fail`) and in which rooms a dead peer touches.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Generic, Protocol, TypeVar

from kvd.core.rooms import (
    RoomError,
    RoomInput,
    RoomMachine,
    RoomState,
    TooManyRooms,
    TransferPath,
    short_reason,
)
from kvd.mem.pools import LocalPool
from kvd.sides.context import RoomContext
from kvd.wire.engine import RoomEvent


class Room(Protocol):
    """The fields every room of either side has."""

    pool: LocalPool
    room: int
    machine: RoomMachine
    path: TransferPath

    @property
    def bytes_done(self) -> int: ...
    @property
    def bytes_total(self) -> int: ...


R = TypeVar("R", bound=Room)

#: Rooms a pool may have in flight beyond its page count. Every room but a zero-page one holds
#: at least one of its pool's pages, so more rooms than pages is an engine (or peer) that opens
#: rooms nobody finishes: each costs memory and housekeeping until its deadline.
ROOMS_OVER_PAGES = 1024


class RoomTable(dict[tuple[int, int], R]):
    """A side's rooms by (pool id, room id), counted per pool so a new room's bound is O(1), and
    indexed by room id so an engine's poll finds its room without a pass over every room."""

    def __init__(self) -> None:
        super().__init__()
        self.per_pool: Counter[int] = Counter()
        self.by_room: dict[int, list[tuple[int, int]]] = {}

    def __setitem__(self, key: tuple[int, int], value: R) -> None:
        if key not in self:
            self.per_pool[key[0]] += 1
            self.by_room.setdefault(key[1], []).append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: tuple[int, int]) -> None:
        super().__delitem__(key)
        self.per_pool[key[0]] -= 1
        if self.per_pool[key[0]] <= 0:
            del self.per_pool[key[0]]
        keys = self.by_room[key[1]]
        keys.remove(key)
        if not keys:
            del self.by_room[key[1]]

    def with_room_id(self, room: int) -> list[R]:
        """The rooms of every pool with this room id (few: ids are per engine)."""
        return [self[k] for k in self.by_room.get(room, ())]

    def check_room_for(self, pool: LocalPool, room: int) -> None:
        """Refuse a new room of ``pool`` past its bound (:data:`ROOMS_OVER_PAGES`)."""
        limit = pool.layout.num_pages + ROOMS_OVER_PAGES
        if (pool.pool_id, room) not in self and self.per_pool[pool.pool_id] >= limit:
            raise TooManyRooms(f"pool {pool.pool_id} already has {limit} rooms in flight (its {pool.layout.num_pages} "
                               f"pages + {ROOMS_OVER_PAGES}); finish or abort some first")


def room_event(rm: Room, *, req_id: int = 0, released: bool = False, aux: bytes = b"") -> RoomEvent:
    """A room's state as the engine sees it (pushed on final states, or a poll's reply)."""
    return RoomEvent(req_id=req_id, room=rm.room, state=rm.machine.state.value, reason=rm.machine.reason,
                     aux=aux, bytes_done=rm.bytes_done, bytes_total=rm.bytes_total, released=released,
                     pool_id=rm.pool.pool_id)


class SideBase(Generic[R]):
    """Rooms of one side, keyed by (pool id, room id); see the module docstring."""

    role = ""

    def __init__(self, ctx: RoomContext) -> None:
        self.ctx = ctx
        self.rooms: RoomTable[R] = RoomTable()

    # --- state changes ------------------------------------------------------------------
    def transition(self, rm: R, event: RoomInput) -> None:
        """Feed one input; a forbidden one fails the room with the reason, never escapes."""
        before = rm.machine.state
        try:
            after = rm.machine.apply(event, self.ctx.now())
        except RoomError as exc:
            self.ctx.count_error("state")
            self.fail(rm, str(exc))
            return
        if after is not before:
            self.ctx.room_changed(self.role, before, after, room=rm.room, pool=rm.pool.key)
            self.entered(rm, after)

    def progress(self, rm: R) -> None:
        """Bytes moved: restarts the deadline, only while the room is live."""
        before = rm.machine.state
        if rm.machine.progress(self.ctx.now()) and rm.machine.state is not before:
            self.ctx.room_changed(self.role, before, rm.machine.state, room=rm.room, pool=rm.pool.key)

    def mark_failed(self, rm: R, reason: str) -> bool:
        """Fail the room unless it already ended (the first failure wins); True if this call did."""
        before = rm.machine.state
        if not rm.machine.fail(self.ctx.now(), reason):
            return False
        self.ctx.room_changed(self.role, before, rm.machine.state, room=rm.room, pool=rm.pool.key,
                              reason=reason)
        return True

    def fail(self, rm: R, reason: str) -> None:
        reason = short_reason(reason)  # logged, kept, and sent to the room's peers: bounded
        if self.mark_failed(rm, reason):
            self.after_fail(rm, reason)

    # --- hooks ---------------------------------------------------------------------------
    def entered(self, rm: R, state: RoomState) -> None:
        """Called after a transition into ``state`` (not for failures through :meth:`fail`)."""

    def after_fail(self, rm: R, reason: str) -> None:
        """What the side does once a room has failed (fence writes, tell peers and the engine)."""

    def tick(self, rm: R, now: float) -> None:
        """Housekeeping for a room that has not expired."""

    def uses_peer(self, rm: R, peer: str) -> bool:
        """Whether ``peer`` takes part in the room (each side names its own peers)."""
        return False

    def peer_lost(self, rm: R, peer: str, now: float) -> None:
        """Bookkeeping before a room fails because ``peer`` died."""

    # --- housekeeping ----------------------------------------------------------------------
    def expire(self, now: float) -> None:
        for rm in list(self.rooms.values()):
            if rm.machine.expired(now):
                self.expired(rm)
            else:
                self.tick(rm, now)

    def expired(self, rm: R) -> None:
        """``rm`` passed its deadline."""
        self.ctx.count_error("timeout")
        self.fail(rm, rm.machine.timeout_reason())

    def peer_dead(self, peer: str, what: str) -> None:
        now = self.ctx.now()
        for rm in list(self.rooms.values()):
            if self.uses_peer(rm, peer):
                self.peer_lost(rm, peer, now)
                self.fail(rm, f"{what} {peer} stopped answering heartbeats")

    def pool_closed(self, pool: LocalPool) -> None:
        for rm in list(self.rooms.values()):
            if rm.pool is pool:
                self.fail(rm, f"the {self.role} engine disconnected")

    def find(self, conn_id: int, room: int) -> R | None:
        """A room of an engine connection, by room id (what an engine's poll names)."""
        for rm in self.rooms.with_room_id(room):
            if rm.pool.conn_id == conn_id:
                return rm
        return None

    def snapshot_base(self, rm: R, peer: str, state: str) -> dict[str, Any]:
        return {"room": rm.room, "role": self.role, "pool_id": rm.pool.pool_id, "engine_id": rm.pool.layout.engine_id,
                "rank": rm.pool.layout.tp_rank, "peer": peer, "state": state, "path": rm.path.value,
                "bytes_done": rm.bytes_done, "bytes_total": rm.bytes_total,
                "age_s": round(self.ctx.now() - rm.machine.created_at, 3)}


__all__ = ["SideBase", "Room", "room_event"]
