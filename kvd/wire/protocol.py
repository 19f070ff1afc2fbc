"""Versioned msgpack messages between engines and kvd, and between kvd daemons.

Sans-IO (like h11): this module turns message objects into bytes and bytes into
message objects, and frames a byte stream; it never touches a socket, asyncio,
zmq or torch.

Wire form of every message: a msgpack array
``[protocol_version, message_type, field_0, field_1, ...]`` with the fields in
the order the message class declares them. The rules that keep peers of
different releases talking:

* fields are only ever appended; a field added after version 1 has a default;
* a decoder ignores trailing fields it does not know (a newer peer);
* a decoder fills defaults for fields the sender did not send (an older peer);
* anything else (wrong type, unknown message type, truncated or non-msgpack
  bytes, a missing field without default) raises one :class:`ProtocolError`
  that names the message and the field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 256 * 1024 * 1024

_REQUIRED: Any = object()


class ProtocolError(ValueError):
    """Bytes that are not a valid kvd message; names the message and the field at fault."""

    def __init__(self, message: str, *, msg_type: str | None = None, field_name: str | None = None):
        where = ".".join(p for p in (msg_type, field_name) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.msg_type = msg_type
        self.field_name = field_name


# --- field types ---------------------------------------------------------------------
# Each wire type has a checker (wire value -> python value, or raise TypeError) and an
# encoder (python value -> wire value).


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("expected a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("expected a boolean")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes | bytearray):
        raise TypeError("expected bytes")
    return bytes(v)


def _map(v: Any) -> dict:
    if not isinstance(v, dict):
        raise TypeError("expected a map")
    return v


def _int_list(v: Any) -> list[int]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of integers")
    return [_int(x) for x in v]


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of strings")
    return [_str(x) for x in v]


def _map_list(v: Any) -> list[dict]:
    if not isinstance(v, list | tuple):
        raise TypeError("expected a list of maps")
    return [_map(x) for x in v]


def _indices(v: Any) -> np.ndarray:
    # Index arrays travel as little-endian int64 bytes: 8 bytes per index, no per-item tags.
    if not isinstance(v, bytes | bytearray) or len(v) % 8:
        raise TypeError("expected an index array (little-endian int64 bytes)")
    return np.frombuffer(bytes(v), dtype="<i8").astype(np.int64)


def _encode_indices(v: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(v, dtype="<i8")).tobytes()


_CHECKERS = {
    "int": _int, "float": _float, "bool": _bool, "str": _str, "bytes": _bytes, "map": _map,
    "ints": _int_list, "strs": _str_list, "maps": _map_list, "indices": _indices,
}
_ENCODERS = {"indices": _encode_indices, "ints": list, "strs": list, "maps": list, "float": float}


@dataclass(frozen=True)
class Field:
    """One declared field: name, wire type, default (REQUIRED for version-1 fields), version added."""

    name: str
    kind: str
    default: Any = _REQUIRED
    since: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _CHECKERS:
            raise ValueError(f"unknown field kind {self.kind!r}")
        if self.since > 1 and self.default is _REQUIRED:
            raise ValueError(f"field {self.name} added in version {self.since} needs a default")


_REGISTRY: dict[int, type[Message]] = {}


class Message:
    """Base of every message. Subclasses declare TYPE (a stable small int) and FIELDS."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[Field, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE in _REGISTRY:
            raise ValueError(f"message type {cls.TYPE} declared twice")
        _REGISTRY[cls.TYPE] = cls

    def encode(self) -> bytes:
        return encode(self)


def _message(type_id: int, *spec: Field):
    """Declare a message class: a frozen dataclass whose fields follow ``spec`` in order."""

    def wrap(cls: type) -> type:
        annotations = {}
        namespace: dict[str, Any] = {"TYPE": type_id, "FIELDS": spec, "__doc__": cls.__doc__,
                                     "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        for f in spec:
            annotations[f.name] = Any
            if f.default is not _REQUIRED:
                if isinstance(f.default, list | dict):
                    raise ValueError("mutable defaults are not allowed in messages")
                namespace[f.name] = f.default
        namespace["__annotations__"] = annotations
        for name, value in vars(cls).items():
            if callable(value) or isinstance(value, property):
                namespace.setdefault(name, value)
        new = type(cls.__name__, (Message,), namespace)
        return dataclass(frozen=True, eq=False)(new)

    return wrap


def encode(msg: Message) -> bytes:
    """Message -> msgpack bytes (header first, fields in declared order)."""
    out: list[Any] = [PROTOCOL_VERSION, msg.TYPE]
    for f in msg.FIELDS:
        value = getattr(msg, f.name)
        try:
            value = _CHECKERS[f.kind](_ENCODERS.get(f.kind, lambda x: x)(value))
            if f.kind == "indices":
                value = _encode_indices(value)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"cannot encode {value!r}: {exc}", msg_type=type(msg).__name__,
                                field_name=f.name) from None
        out.append(value)
    return msgpack.packb(out, use_bin_type=True)


def decode(data: bytes) -> Message:
    """msgpack bytes -> Message, tolerant of newer (extra fields) and older (defaults) peers."""
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(items, list) or len(items) < 2:
        raise ProtocolError("a message is an array [version, type, fields...]")
    version, type_id = items[0], items[1]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ProtocolError(f"bad protocol version {version!r}", field_name="version")
    cls = _REGISTRY.get(type_id) if isinstance(type_id, int) and not isinstance(type_id, bool) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_id!r}", field_name="type")
    values = items[2:]
    kwargs: dict[str, Any] = {}
    for i, f in enumerate(cls.FIELDS):
        if i < len(values):
            try:
                kwargs[f.name] = _CHECKERS[f.kind](values[i])
            except TypeError as exc:
                raise ProtocolError(f"{exc}, got {type(values[i]).__name__}", msg_type=cls.__name__,
                                    field_name=f.name) from None
        elif f.default is _REQUIRED:
            raise ProtocolError("missing required field (truncated message)", msg_type=cls.__name__,
                                field_name=f.name)
    return cls(**kwargs)


def field_names(cls: type[Message]) -> list[str]:
    return [f.name for f in cls.FIELDS]


# --- stream framing (Unix socket) ---------------------------------------------------------

_LEN = struct.Struct(">I")


def frame(payload: bytes) -> bytes:
    """Length-prefix one encoded message for a byte stream."""
    return _LEN.pack(len(payload)) + payload


class FrameBuffer:
    """Feed stream bytes in, take whole payloads out (sans-IO, like h11's receive buffer)."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_payload(self) -> bytes | None:
        if len(self._buf) < _LEN.size:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if size > self._max:
            raise ProtocolError(f"frame of {size} bytes exceeds the {self._max}-byte limit")
        if len(self._buf) < _LEN.size + size:
            return None
        payload = bytes(self._buf[_LEN.size:_LEN.size + size])
        del self._buf[:_LEN.size + size]
        return payload


# --- engine <-> daemon (Unix socket) ---------------------------------------------------------
# Every request carries req_id; the daemon answers with Ok/Error/a typed reply bearing the
# same req_id. Events the daemon pushes unasked (RoomEvent) carry req_id 0.

@_message(1, Field("req_id", "int"), Field("layout", "map"), Field("memory", "map"),
          Field("bootstrap", "str", ""))
class RegisterPool:
    """An engine rank hands its KV pool to kvd. memory: {"kind": "shm", "name", "offsets"} or
    {"kind": "cuda_ipc", "handles": [...]}; bootstrap: directory daemon of a prefill engine
    ("" = this daemon)."""


@_message(2, Field("req_id", "int"), Field("pool_id", "int"))
class PoolRegistered:
    """Reply to RegisterPool."""


@_message(3, Field("req_id", "int"), Field("pool_id", "int"), Field("room", "int"),
          Field("pages", "indices"), Field("is_last", "bool"), Field("aux", "bytes", b""),
          Field("page_offset", "int", -1))
class SendChunk:
    """Prefill: the pages of one chunk of ``room`` are computed; aux rides with the last chunk.
    page_offset: pages of the room sent before this chunk (-1: unknown). A chunk at offset > 0
    for a room that is not in flight is a late chunk of an ended room, not a new room."""


@_message(4, Field("req_id", "int"), Field("pool_id", "int"), Field("room", "int"),
          Field("bootstrap_addr", "str"), Field("prefill_engine_id", "str"),
          Field("pages", "indices"), Field("timeout_s", "float", 0.0),
          Field("enable_hisparse", "bool", False, since=1))
class RecvRoom:
    """Decode: receive ``room`` from a prefill engine into ``pages`` (HiSparse: token indices)."""


@_message(5, Field("req_id", "int"), Field("room", "int"))
class PollRoom:
    """Ask for a room's state now."""


@_message(6, Field("req_id", "int"), Field("pool_id", "int"), Field("room", "int"))
class AbortRoom:
    """Abort a room; the reply (RoomEvent state "released"/final) comes once no write can land."""


@_message(7, Field("req_id", "int"))
class StatusRequest:
    """kvctl: what is in flight."""


@_message(8, Field("req_id", "int"), Field("status", "map"))
class StatusReply:
    """The daemon's status snapshot (see kvd.state.DaemonState.snapshot)."""


@_message(9, Field("req_id", "int"))
class Ok:
    """Plain success reply."""


@_message(10, Field("req_id", "int"), Field("kind", "str"), Field("message", "str"),
          Field("room", "int", -1))
class ErrorReply:
    """Typed failure reply; kind maps to a client exception class."""


@_message(11, Field("req_id", "int"), Field("room", "int"), Field("state", "str"),
          Field("reason", "str", ""), Field("aux", "bytes", b""), Field("bytes_done", "int", 0),
          Field("bytes_total", "int", 0), Field("released", "bool", False))
class RoomEvent:
    """A room's state, pushed on every final state (req_id 0) or sent as a reply to PollRoom."""


# --- daemon <-> daemon (ZMQ) -----------------------------------------------------------------
# Every peer message starts with the sender daemon's address so replies and heartbeats can be
# routed, and with the shared auth token.

@_message(32, Field("src", "str"), Field("token", "str"), Field("nonce", "int"))
class Heartbeat:
    """Liveness ping; answered by HeartbeatAck."""


@_message(33, Field("src", "str"), Field("token", "str"), Field("nonce", "int"))
class HeartbeatAck:
    """Answer to Heartbeat."""


@_message(34, Field("src", "str"), Field("token", "str"), Field("layout", "map"))
class RankAnnounce:
    """A daemon tells an engine's directory daemon that it serves one prefill rank."""


@_message(35, Field("src", "str"), Field("token", "str"), Field("engine_id", "str"))
class EngineQuery:
    """Decode daemon -> directory: topology of a prefill engine."""


@_message(36, Field("src", "str"), Field("token", "str"), Field("engine_id", "str"),
          Field("ready", "bool"), Field("tp_size", "int"), Field("layouts", "maps"),
          Field("daemons", "strs"), Field("error", "str", ""))
class EngineInfo:
    """Directory -> decode daemon: per prefill rank its layout and serving daemon (ready only
    once every rank has registered, like SGLang's 503-until-complete)."""


@_message(37, Field("src", "str"), Field("token", "str"), Field("pool_key", "str"),
          Field("layout", "map"), Field("buffers", "ints"), Field("session_id", "str"),
          Field("prefill_engine_id", "str"), Field("staging_base", "int", 0, since=2),
          Field("staging_bytes", "int", 0, since=2))
class PoolAnnounce:
    """Decode daemon -> prefill daemon, once per (decode pool, prefill engine): the receiver's
    layout and registered buffer addresses, so per-room requests stay small. A receiver with
    a staging pool names its registered range (``staging_bytes`` 0: none, or an older peer)."""


@_message(38, Field("src", "str"), Field("token", "str"), Field("pool_key", "str"),
          Field("ok", "bool"), Field("error", "str", ""), Field("staging", "bool", False, since=2))
class PoolAck:
    """Prefill daemon accepts (or refuses, naming both layouts) a decode pool. ``staging``:
    it will take the staged path for this pool (an older peer leaves it False: per-slice)."""


@_message(39, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("prefill_engine_id", "str"),
          Field("sender_rank", "int"), Field("dst_indices", "indices"), Field("dummy", "bool"),
          Field("deadline_s", "float"), Field("enable_hisparse", "bool", False, since=2),
          Field("chunk_tokens", "int", 0, since=2), Field("writer", "int", 0, since=2),
          Field("writers", "int", 0, since=2))
class TransferRequest:
    """Decode -> prefill, per room and sender rank: where to write (page indices, or token
    indices into a HiSparse host pool). A dummy request has nothing to write; it only lets
    a replica sender finish. transfer_id tells a reused room id's transfers apart.

    ``chunk_tokens`` > 0 asks for the staged path: the room goes in chunks of that many
    tokens, this sender's block is number ``writer`` of ``writers`` in each chunk's region,
    and each region's offset follows in a StagingGrant."""


@_message(40, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("sender_rank", "int"),
          Field("ok", "bool"), Field("reason", "str", ""), Field("aux", "bytes", b""),
          Field("bytes_written", "int", 0), Field("final", "bool", True))
class TransferStatus:
    """Prefill -> decode: a sender rank finished writing a room (or failed, with the reason).
    Non-final statuses report progress (bytes written so far)."""


@_message(41, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("sender_rank", "int"),
          Field("reason", "str", ""))
class AbortTransfer:
    """Decode -> prefill: stop writing this room; answer AbortAck once no write can land."""


@_message(42, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("sender_rank", "int"))
class AbortAck:
    """Prefill -> decode: every write of the room has finished or will never be issued."""


@_message(43, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("sender_rank", "int"),
          Field("chunk", "int"), Field("offset", "int"))
class StagingGrant:
    """Decode -> prefill (staged path): chunk ``chunk``'s region starts at ``offset`` in the
    receiver's staging pool. Sent as space frees up, a few chunks ahead of the writes."""


@_message(44, Field("src", "str"), Field("token", "str"), Field("room", "int"),
          Field("transfer_id", "int"), Field("pool_key", "str"), Field("sender_rank", "int"),
          Field("chunk", "int"), Field("nbytes", "int"))
class ChunkWritten:
    """Prefill -> decode (staged path): this sender's block of a chunk has landed."""


PEER_MESSAGES = (Heartbeat, HeartbeatAck, RankAnnounce, EngineQuery, EngineInfo, PoolAnnounce,
                 PoolAck, TransferRequest, TransferStatus, AbortTransfer, AbortAck, StagingGrant,
                 ChunkWritten)
ENGINE_REQUESTS = (RegisterPool, SendChunk, RecvRoom, PollRoom, AbortRoom, StatusRequest)

__all__ = [
    "PROTOCOL_VERSION", "ProtocolError", "Field", "Message", "encode", "decode", "frame",
    "FrameBuffer", "field_names", "PEER_MESSAGES", "ENGINE_REQUESTS",
    "RegisterPool", "PoolRegistered", "SendChunk", "RecvRoom", "PollRoom", "AbortRoom",
    "StatusRequest", "StatusReply", "Ok", "ErrorReply", "RoomEvent",
    "Heartbeat", "HeartbeatAck", "RankAnnounce", "EngineQuery", "EngineInfo", "PoolAnnounce",
    "PoolAck", "TransferRequest", "TransferStatus", "AbortTransfer", "AbortAck", "StagingGrant",
    "ChunkWritten",
]
