"""Wire protocol: typed, versioned msgpack messages and stream framing.

Sans-IO (like h11): bytes in, message objects out, and back. It imports nothing else of kvd
and never asyncio, zmq or torch (a test checks), so an engine process or a tool can load it
cheaply.

- ``fields``: field kinds, the ``wire(default, since=N)`` specifier, PROTOCOL_VERSION;
- ``codec``: the Message base, registry, encode/decode, ProtocolError;
- ``framing``: length-prefixed frames on a byte stream;
- ``engine``: engine <-> daemon messages; ``peer``: daemon <-> daemon messages.

``kvd.wire.protocol`` (and ``kvd.protocol``) keep the one-module import path of old.
"""

from kvd.wire.codec import Message, ProtocolError, decode, encode, field_names, message_types
from kvd.wire.engine import (
    ENGINE_REPLIES,
    ENGINE_REQUESTS,
    AbortRoom,
    ErrorReply,
    Ok,
    PollRoom,
    PoolRegistered,
    RecvRoom,
    RegisterPool,
    RoomEvent,
    SendChunk,
    StatusReply,
    StatusRequest,
)
from kvd.wire.fields import HEADER_VERSION, PROTOCOL_VERSION, REQUIRED, Field, Indices, Map, wire
from kvd.wire.framing import MAX_FRAME_BYTES, FrameBuffer, frame
from kvd.wire.peer import (
    PEER_MESSAGES,
    AbortAck,
    AbortTransfer,
    ChunkWritten,
    EngineInfo,
    EngineQuery,
    Heartbeat,
    HeartbeatAck,
    PeerMessage,
    PoolAck,
    PoolAnnounce,
    RankAnnounce,
    RoomOutcome,
    StagingGrant,
    TransferRequest,
    TransferStatus,
    stamped,
)

__all__ = [
    "ENGINE_REPLIES", "ENGINE_REQUESTS", "HEADER_VERSION", "MAX_FRAME_BYTES", "PEER_MESSAGES",
    "PROTOCOL_VERSION", "REQUIRED",
    "Field", "FrameBuffer", "Indices", "Map", "Message", "PeerMessage", "ProtocolError",
    "decode", "encode", "field_names", "frame", "message_types", "stamped", "wire",
    "AbortRoom", "ErrorReply", "Ok", "PollRoom", "PoolRegistered", "RecvRoom", "RegisterPool",
    "RoomEvent", "SendChunk", "StatusReply", "StatusRequest",
    "AbortAck", "AbortTransfer", "ChunkWritten", "RoomOutcome", "EngineInfo", "EngineQuery", "Heartbeat",
    "HeartbeatAck", "PoolAck", "PoolAnnounce", "RankAnnounce", "StagingGrant", "TransferRequest",
    "TransferStatus",
]
