"""Messages between an engine rank and its kvd daemon (Unix socket): requests, replies, events.

Every request carries req_id; the daemon answers with Ok, ErrorReply or a typed reply bearing
the same req_id. Events the daemon pushes unasked (RoomEvent) carry req_id 0.

Declarations only: each class is a frozen dataclass whose annotations are its wire fields, in
wire order; append new fields at the end with ``wire(default, since=PROTOCOL_VERSION)``. TYPE
numbers are forever. This module never touches a socket, asyncio, zmq or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvd.wire.codec import Message, leading_items
from kvd.wire.fields import Indices, Map, wire


@dataclass(frozen=True, eq=False, kw_only=True)
class RegisterPool(Message):
    """An engine rank hands its KV pool to kvd. memory: {"kind": "shm", "name", "offsets"} or
    {"kind": "cuda_ipc", "handles": [...]}; bootstrap: directory daemon of a prefill engine
    ("" = this daemon)."""

    TYPE = 1
    req_id: int
    layout: Map
    memory: Map
    bootstrap: str = ""


@dataclass(frozen=True, eq=False, kw_only=True)
class PoolRegistered(Message):
    """Reply to RegisterPool."""

    TYPE = 2
    req_id: int
    pool_id: int


@dataclass(frozen=True, eq=False, kw_only=True)
class SendChunk(Message):
    """Prefill: the pages of one chunk of ``room`` are computed; aux rides with the last chunk.
    page_offset: pages of the room sent before this chunk (-1: unknown). A chunk at offset > 0
    for a room that is not in flight is a late chunk of an ended room, not a new room."""

    TYPE = 3
    req_id: int
    pool_id: int
    room: int
    pages: Indices
    is_last: bool
    aux: bytes = b""
    page_offset: int = -1


@dataclass(frozen=True, eq=False, kw_only=True)
class RecvRoom(Message):
    """Decode: receive ``room`` from a prefill engine into ``pages`` (HiSparse: token indices)."""

    TYPE = 4
    req_id: int
    pool_id: int
    room: int
    bootstrap_addr: str
    prefill_engine_id: str
    pages: Indices
    timeout_s: float = 0.0
    enable_hisparse: bool = False


@dataclass(frozen=True, eq=False, kw_only=True)
class PollRoom(Message):
    """Ask for a room's state now; pool_id -1 (an older client): the room of that id on any pool
    of the connection."""

    TYPE = 5
    req_id: int
    room: int
    pool_id: int = wire(-1, since=6)


@dataclass(frozen=True, eq=False, kw_only=True)
class AbortRoom(Message):
    """Abort a room; the reply (RoomEvent state "released"/final) comes once no write can land."""

    TYPE = 6
    req_id: int
    pool_id: int
    room: int


@dataclass(frozen=True, eq=False, kw_only=True)
class StatusRequest(Message):
    """kvctl: what is in flight."""

    TYPE = 7
    req_id: int


@dataclass(frozen=True, eq=False, kw_only=True)
class StatusReply(Message):
    """The daemon's status snapshot."""

    TYPE = 8
    req_id: int
    status: Map


@dataclass(frozen=True, eq=False, kw_only=True)
class Ok(Message):
    """Plain success reply."""

    TYPE = 9
    req_id: int


@dataclass(frozen=True, eq=False, kw_only=True)
class ErrorReply(Message):
    """Typed failure reply; kind maps to a client exception class."""

    TYPE = 10
    req_id: int
    kind: str
    message: str
    room: int = -1


@dataclass(frozen=True, eq=False, kw_only=True)
class RoomEvent(Message):
    """A room's state, pushed on every final state (req_id 0) or sent as a reply to PollRoom.
    pool_id: the pool the room is on (-1: an older daemon), so that the ranks of one engine
    sharing a connection, each with the same room id, are told apart."""

    TYPE = 11
    req_id: int
    room: int
    state: str
    reason: str = ""
    aux: bytes = b""
    bytes_done: int = 0
    bytes_total: int = 0
    released: bool = False
    pool_id: int = wire(-1, since=6)


ENGINE_REQUESTS = (RegisterPool, SendChunk, RecvRoom, PollRoom, AbortRoom, StatusRequest)
"""What an engine (or kvctl) may send a daemon."""

def request_id(payload: bytes) -> int:
    """The req_id a request frame carries, read from the raw bytes (0: none to be found), for a
    frame whose fields do not decode: its refusal then answers the request the engine waits on.
    Every engine request is ``[version, type, req_id, ...]``."""
    items = leading_items(payload, 3)
    if len(items) < 3 or type(items[1]) is not int or items[1] not in _REQUEST_TYPES:
        return 0
    req_id = items[2]
    return req_id if type(req_id) is int and 0 < req_id < 1 << 63 else 0


_REQUEST_TYPES = frozenset(cls.TYPE for cls in ENGINE_REQUESTS)

ENGINE_REPLIES = (PoolRegistered, StatusReply, Ok, ErrorReply, RoomEvent)
"""What a daemon sends an engine: replies, and RoomEvent pushed unasked."""

__all__ = ["ENGINE_REPLIES", "ENGINE_REQUESTS", "AbortRoom", "ErrorReply", "Ok", "PollRoom", "PoolRegistered",
           "RecvRoom", "RegisterPool", "RoomEvent", "SendChunk", "StatusReply", "StatusRequest", "request_id"]
