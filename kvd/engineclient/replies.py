"""What the engine client makes of the daemon's replies: typed errors, room status, and the
sans-IO :class:`ReplyTracker` both clients share (requests out, replies and pushed room
events in; no sockets, so it is tested without a daemon).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgpack
import numpy as np

from kvd.core.layout import PoolLayout
from kvd.engineclient.hostpool import HostPool
from kvd.wire import protocol as p
from kvd.wire.protocol import ErrorReply, Message, ProtocolError, RoomEvent

FINAL_STATES = ("success", "failed")
Pages = Sequence[int] | np.ndarray
T = TypeVar("T", bound=Message)


# --- exceptions ------------------------------------------------------------------------------

class KvdError(Exception):
    """Base of every kvd client error; ``kind`` is the daemon's error kind, ``room`` -1 if none."""

    def __init__(self, message: str, kind: str = "error", room: int = -1) -> None:
        super().__init__(message)
        self.kind = kind
        self.room = room


class KvdProtocolError(KvdError):
    """The daemon could not parse what we sent, or we could not parse its answer."""


class _UndecodableFrame(KvdProtocolError):
    """A whole frame arrived but is no message we know; ``req_id`` is our best guess (0: none)."""

    def __init__(self, message: str, req_id: int) -> None:
        super().__init__(message, kind="protocol")
        self.req_id = req_id


class KvdBadRequest(KvdError):
    """A request was well-formed but not acceptable (bad pages, bad state for the room...)."""


class KvdLayoutError(KvdError):
    """The pool layout is invalid or cannot be mapped onto the peer's."""


class KvdUnknownError(KvdError):
    """The daemon does not know the pool or room named in the request."""


class KvdRegistrationError(KvdError):
    """The pool's memory could not be opened or registered; the message says why and the fix."""


class KvdBusyError(KvdError):
    """The daemon refuses more work for now (back-pressure); retry later."""


class RoomFailed(KvdError):
    """A room ended in state "failed"; ``status`` holds the daemon's final event."""

    def __init__(self, status: RoomStatus) -> None:
        super().__init__(f"room {status.room} failed: {status.reason or 'no reason given'}",
                         kind="room_failed", room=status.room)
        self.status = status


class KvdTimeout(KvdError, TimeoutError):
    """No reply or event arrived within the caller's time limit."""


class KvdConnectionError(KvdError, ConnectionError):
    """The daemon's socket is unreachable or closed."""


ERROR_CLASSES: dict[str, type[KvdError]] = {
    "protocol": KvdProtocolError, "bad_request": KvdBadRequest, "layout": KvdLayoutError,
    "unknown_pool": KvdUnknownError, "unknown_room": KvdUnknownError,
    "registration": KvdRegistrationError, "busy": KvdBusyError,
}


def error_from_reply(reply: ErrorReply) -> KvdError:
    """Map a daemon ErrorReply to the exception class engines catch."""
    cls = ERROR_CLASSES.get(reply.kind, KvdError)
    where = f" (room {reply.room})" if reply.room >= 0 else ""
    return cls(f"kvd refused the request [{reply.kind}]{where}: {reply.message}",
               kind=reply.kind, room=reply.room)


@dataclass(frozen=True)
class RoomStatus:
    """A room's state as the daemon last reported it."""

    room: int
    state: str
    reason: str = ""
    aux: bytes = b""
    bytes_done: int = 0
    bytes_total: int = 0
    released: bool = False

    @property
    def done(self) -> bool:
        """True once the room reached a final state (success or failed)."""
        return self.state in FINAL_STATES

    @classmethod
    def from_event(cls, ev: RoomEvent) -> RoomStatus:
        return cls(room=ev.room, state=ev.state, reason=ev.reason, aux=ev.aux,
                   bytes_done=ev.bytes_done, bytes_total=ev.bytes_total, released=ev.released)


# --- shared, I/O-free reply handling -----------------------------------------------------------

#: Rooms begun and not ended that a client keeps track of (the oldest is dropped past it).
MAX_LIVE_TRACKED = 1 << 16


class ReplyTracker:
    """Bookkeeping both clients share: request ids, reply checking and the pushed-event stash.

    The stash keeps, per room, the latest pushed event; a ``released`` flag once seen stays
    set, because a released room can never become unreleased. Released entries beyond
    ``max_released`` are forgotten oldest first, so a long-lived engine does not grow without
    bound; rooms still in flight are never forgotten.

    One connection may serve several pools (the ranks of one engine in one process), each with
    the same room id. Events name their pool, so the room's status is then the merge over the
    pools that began it: final once every one of them is (failed if any failed), released once
    every one is. A pool that begins the id again starts a new use of it.
    """

    def __init__(self, max_released: int = 4096) -> None:
        self._next_id = 0
        self._stash: dict[int, RoomStatus] = {}
        # Per room: each pool that began its current use -> that pool's latest status (None: none yet).
        self._pools: dict[int, dict[int, RoomStatus | None]] = {}
        self._sending: set[tuple[int, int]] = set()  # (pool, room): prefill rooms with chunks still to come
        self._sent_pages: dict[tuple[int, int], int] = {}  # pages sent so far per (pool, room) in flight
        # Chunks sent without waiting for their reply (``send(wait=False)``): req_id -> (room, pool).
        # (None: a chunk of a room use that ended, forgotten or its id reused: its reply touches nothing)
        self._unacked: dict[int, tuple[int, int] | None] = {}
        self._unacked_rooms: Counter[int] = Counter()  # room -> its entries in _unacked
        self._refused: dict[int, str] = {}  # room -> why the daemon refused one of its chunks
        # Rooms begun (a recv, a first chunk) whose final event has not come, oldest first: what
        # fails here if the connection is lost (the daemon will push nothing more for them).
        self._live: dict[int, None] = {}
        self.max_released = max_released

    def next_req_id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def decode_frame(payload: bytes) -> Message:
        """Decode one frame, or raise _UndecodableFrame naming the request it likely answers:
        framing is intact, so only that request fails and the connection goes on."""
        try:
            return p.decode(payload)
        except ProtocolError as exc:
            items: Any = None
            with contextlib.suppress(Exception):  # garbage bytes: no request to blame
                items = msgpack.unpackb(payload, raw=False)
            # req_id is the first field of every engine message: [version, type, req_id, ...]
            ok = isinstance(items, list) and len(items) > 2 and type(items[2]) is int
            raise _UndecodableFrame(f"undecodable message from kvd: {exc}", items[2] if ok else 0) from None

    @staticmethod
    def is_push(msg: Message) -> bool:  # an unasked event
        return isinstance(msg, RoomEvent) and msg.req_id == 0

    def on_push(self, ev: RoomEvent) -> RoomStatus:
        """Stash a pushed event and return the room's merged status."""
        new = RoomStatus.from_event(ev)
        pools = self._pools.get(ev.room)
        if pools is not None and ev.pool_id >= 0 and ev.pool_id not in pools:
            # A pool outside the id's current use (its own use of the id ended, and another pool
            # began the id since): its late events say nothing of this use.
            current = self._stash.get(ev.room)
            return current if current is not None else new
        if pools is not None and ev.pool_id in pools:
            before = pools[ev.pool_id]
            if before is not None and before.released and not new.released:
                new = replace(new, released=True)
            pools[ev.pool_id] = new
            if len(pools) > 1:
                new = _merged(ev.room, pools)
        elif pools is not None and ev.pool_id < 0:  # an older daemon's event, or a failure made here
            for pool in pools:
                pools[pool] = new
        old = self._stash.pop(ev.room, None)
        if old is not None and old.released and not new.released:
            new = replace(new, released=True)
        if ev.room in self._refused:  # a refused chunk failed the room here: it stays failed
            new = replace(new, state="failed", reason=self._refused[ev.room])
        self._stash[ev.room] = new  # re-insert: dict order is then oldest-first
        if new.done:
            self._live.pop(ev.room, None)
        if len(self._stash) > 2 * self.max_released:
            released = [room for room, st in self._stash.items() if st.released]
            for room in released[:max(0, len(released) - self.max_released)]:
                del self._stash[room]
        return new

    @staticmethod
    def result(reply: Message, expected: type[T]) -> T:
        """The reply as ``expected``, or raise the exception an ErrorReply stands for."""
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply)
        if not isinstance(reply, expected):
            raise KvdProtocolError(f"expected {expected.__name__} from kvd, got {type(reply).__name__}",
                                   kind="protocol")
        return reply

    def start_room(self, room: int, is_last: bool = True, sending: bool = False, pool_id: int = -1) -> None:
        """A room id is (re)used: drop the previous use's events. Only a prefill room's first
        chunk does, so a failure pushed between chunks still reaches ``wait()``. Another pool of
        this connection beginning the same id joins its use (the ranks of one engine)."""
        key = (pool_id, room)
        pools = self._pools.get(room)
        joining = pools is not None and pool_id >= 0 and pool_id not in pools
        if joining and pools is not None:
            pools[pool_id] = None
            if room in self._stash:  # what the other pools reported, no longer final
                self._stash[room] = _merged(room, pools)
        elif not sending or key not in self._sending:
            self._stash.pop(room, None)
            self._refused.pop(room, None)
            self._end_use(room)
            self._pools.pop(room, None)
            if pool_id >= 0:
                self._pools[room] = {pool_id: None}
        self._live[room] = None
        if len(self._live) > MAX_LIVE_TRACKED:  # an engine that never forgets refused rooms: bounded
            del self._live[next(iter(self._live))]
        if sending and not is_last:
            self._sending.add(key)
        else:
            self._sending.discard(key)

    def final(self, room: int) -> RoomStatus | None:
        """The room's final status if one was pushed, else None."""
        return st if (st := self._stash.get(room)) is not None and st.done else None

    def pushed(self, room: int) -> RoomStatus | None:
        """The room's latest pushed status, final or not (None: nothing pushed)."""
        return self._stash.get(room)

    def released(self, room: int) -> RoomStatus | None:
        return st if (st := self._stash.get(room)) is not None and st.released else None

    def connection_lost(self, why: str) -> None:
        """The connection to the daemon is gone: every room begun and not ended fails here, as a
        pushed failure would (the daemon pushes nothing more, and an engine that reads its rooms'
        states from the pushed view, as the SGLang backend does, would see them in flight forever).
        Not released: whether a write can still land is the daemon's to say (a daemon that is
        gone writes nothing; one still running fences the rooms of a connection that closed)."""
        rooms = [*self._live, *(r for r, st in self._stash.items() if not st.done)]
        self._live.clear()
        for room in dict.fromkeys(rooms):
            self.on_push(RoomEvent(req_id=0, room=room, state="failed", reason=f"kvd connection lost: {why}"))

    def forget(self, room: int) -> None:
        """Drop what is known of a room (the engine is done with it)."""
        self._live.pop(room, None)
        self._stash.pop(room, None)
        for pool in self._pools.pop(room, None) or ():
            self._sending.discard((pool, room))
            self._sent_pages.pop((pool, room), None)
        self._sending.discard((-1, room))
        self._sent_pages.pop((-1, room), None)
        self._refused.pop(room, None)
        self._end_use(room)

    def _end_use(self, room: int) -> None:
        """The engine is done with this use of ``room``: replies still due to its chunks are
        taken but touch nothing (not the stash of a forgotten room, not the id's next use)."""
        if self._unacked_rooms.pop(room, 0):
            for req_id, r in self._unacked.items():
                if r is not None and r[0] == room:
                    self._unacked[req_id] = None

    # --- chunks sent without waiting for their reply ------------------------------------------
    def expect_later(self, msg: p.SendChunk) -> None:
        """``msg`` went out with no one waiting for its reply (:meth:`on_late_reply` takes it)."""
        self._unacked[msg.req_id] = (msg.room, msg.pool_id)
        self._unacked_rooms[msg.room] += 1

    @property
    def unacked(self) -> int:
        """Replies to chunks sent without waiting that have not arrived yet."""
        return len(self._unacked)

    def on_late_reply(self, msg: Message) -> bool:
        """Take the reply to a chunk sent without waiting (False: not one). A refusal fails the
        room here, as a pushed failure would: ``wait()`` raises RoomFailed with the daemon's
        reason, and the engine aborts the room as it does for any failed room."""
        req_id = getattr(msg, "req_id", -1)
        if req_id not in self._unacked:
            return False
        sent = self._unacked.pop(req_id)
        if sent is None:
            return True
        room, pool_id = sent
        self._unacked_rooms[room] -= 1
        if self._unacked_rooms[room] <= 0:
            del self._unacked_rooms[room]
        if isinstance(msg, ErrorReply):
            reason = f"kvd refused a chunk [{msg.kind}]: {msg.message}"
            self._refused[room] = reason
            self.on_push(RoomEvent(req_id=0, room=room, state="failed", reason=reason, pool_id=pool_id))
        return True

    def on_undecodable(self, exc: _UndecodableFrame) -> bool:
        """An undecodable answer to a chunk sent without waiting (False: not one): its outcome is
        unknown, so the room fails as for a refusal, and the chunk is no longer unanswered."""
        if not exc.req_id or exc.req_id not in self._unacked:
            return False
        sent = self._unacked[exc.req_id]
        return self.on_late_reply(ErrorReply(req_id=exc.req_id, kind="protocol", message=str(exc),
                                             room=-1 if sent is None else sent[0]))

    @staticmethod
    def check_final(status: RoomStatus) -> RoomStatus:
        """Return a successful status, raise RoomFailed for a failed one."""
        if status.state == "failed":
            raise RoomFailed(status)
        return status

    # Request builders: each takes a fresh req_id and names the reply type it expects, so the
    # two clients differ only in how bytes move.
    def register(self, layout: PoolLayout, memory: dict[str, Any] | HostPool,
                 bootstrap: str) -> tuple[Message, type[p.PoolRegistered]]:
        mem = memory.memory if isinstance(memory, HostPool) else memory
        return p.RegisterPool(req_id=self.next_req_id(), layout=layout.to_dict(), memory=mem,
                              bootstrap=bootstrap), p.PoolRegistered

    def send(self, pool_id: int, room: int, pages: Pages, is_last: bool,
             aux: bytes) -> tuple[Message, type[p.Ok]]:
        pool_id, room = _wire_int(pool_id, "pool_id"), _wire_int(room, "room")
        arr = _pages(pages)
        key = (pool_id, room)
        offset = self._sent_pages.get(key, 0) if key in self._sending else 0
        msg = p.SendChunk(req_id=self.next_req_id(), pool_id=pool_id, room=room, pages=arr,
                          is_last=bool(is_last), aux=bytes(aux), page_offset=offset)
        self.start_room(room, is_last=is_last, sending=True, pool_id=pool_id)
        # The page offset tells kvd a late chunk of an ended room from a new room's first chunk.
        if is_last:
            self._sent_pages.pop(key, None)
        else:
            self._sent_pages[key] = offset + len(arr)
        return msg, p.Ok

    def recv(self, pool_id: int, room: int, bootstrap_addr: str, prefill_engine_id: str, pages: Pages,
             timeout_s: float, enable_hisparse: bool) -> tuple[Message, type[p.Ok]]:
        pool_id, room = _wire_int(pool_id, "pool_id"), _wire_int(room, "room")
        msg = p.RecvRoom(req_id=self.next_req_id(), pool_id=pool_id, room=room,
                         bootstrap_addr=bootstrap_addr, prefill_engine_id=prefill_engine_id,
                         pages=_pages(pages), timeout_s=float(timeout_s),
                         enable_hisparse=bool(enable_hisparse))
        self.start_room(room, pool_id=pool_id)
        return msg, p.Ok

    def poll(self, room: int, pool_id: int = -1) -> tuple[Message, type[RoomEvent]]:
        return p.PollRoom(req_id=self.next_req_id(), room=_wire_int(room, "room"),
                          pool_id=_wire_int(pool_id, "pool_id")), RoomEvent

    def pools(self, room: int) -> list[int]:
        """The pools of this connection that began the current use of ``room`` (none known: [-1])."""
        return list(self._pools.get(room) or ()) or [-1]

    @staticmethod
    def merge_polls(room: int, polled: dict[int, RoomStatus]) -> RoomStatus:
        """One room's status from a poll of each of its pools (see the class docstring)."""
        only = next(iter(polled.values()))
        return only if len(polled) == 1 else _merged(room, dict(polled))

    def abort(self, pool_id: int, room: int) -> tuple[Message, type[p.Ok]]:
        return p.AbortRoom(req_id=self.next_req_id(), pool_id=_wire_int(pool_id, "pool_id"),
                           room=_wire_int(room, "room")), p.Ok

    def status(self) -> tuple[Message, type[p.StatusReply]]:
        return p.StatusRequest(req_id=self.next_req_id()), p.StatusReply


def _merged(room: int, pools: dict[int, RoomStatus | None]) -> RoomStatus:
    """One room's status over the pools of a connection that began it: final once every pool's
    is (failed if any failed), released once every pool's is, bytes summed."""
    seen = [st for st in pools.values() if st is not None]
    failed = next((st for st in seen if st.state == "failed"), None)
    every = len(seen) == len(pools)
    if failed is not None:
        state, reason = "failed", failed.reason
    elif every and all(st.state == "success" for st in seen):
        state, reason = "success", ""
    else:
        state = next((st.state for st in seen if not st.done), "waiting_for_input")
        reason = ""
    return RoomStatus(room=room, state=state, reason=reason,
                      aux=next((st.aux for st in seen if st.aux), b""),
                      bytes_done=sum(st.bytes_done for st in seen), bytes_total=sum(st.bytes_total for st in seen),
                      released=every and all(st.released for st in seen))


def _wire_int(value: Any, what: str) -> int:
    """A room or pool id as the wire carries it (msgpack: -2**63 .. 2**64 - 1); a numpy integer is
    taken as the int it is. Anything else is the caller's mistake, refused before it is sent."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not -(1 << 63) <= int(value) < 1 << 64:
        raise KvdBadRequest(f"{what} must be an integer in [-2**63, 2**64), got {str(value)[:40]!r}",
                            kind="bad_request")
    return int(value)


def _pages(pages: Pages) -> np.ndarray:
    """Page (or token) indices as a 1-D int64 array, refusing floats and nested lists."""
    arr = np.asarray(pages)
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise KvdBadRequest(f"pages must be a 1-D sequence of integers, got {arr.dtype} shape {arr.shape}",
                            kind="bad_request")
    return arr.astype(np.int64).reshape(-1)
