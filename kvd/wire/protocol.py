"""Compatibility path: the one-module protocol of old (``from kvd.wire import protocol as p``).

It re-exports the names it always had (``__all__`` unchanged, plus ``MAX_FRAME_BYTES``) from
the split package: ``fields``, ``codec``, ``framing``, ``engine`` and ``peer``. New code may
import from ``kvd.wire`` directly. Nothing is defined here, and nothing new should be.
"""

from kvd.wire.codec import Message, ProtocolError, decode, encode, field_names
from kvd.wire.engine import (
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
from kvd.wire.fields import PROTOCOL_VERSION, Field
from kvd.wire.framing import MAX_FRAME_BYTES as MAX_FRAME_BYTES  # not in __all__, used as p.MAX_FRAME_BYTES
from kvd.wire.framing import FrameBuffer, frame
from kvd.wire.peer import (
    PEER_MESSAGES,
    AbortAck,
    AbortTransfer,
    ChunkWritten,
    EngineInfo,
    EngineQuery,
    Heartbeat,
    HeartbeatAck,
    PoolAck,
    PoolAnnounce,
    RankAnnounce,
    RoomOutcome,
    StagingGrant,
    TransferRequest,
    TransferStatus,
)

__all__ = [
    "PROTOCOL_VERSION", "ProtocolError", "Field", "Message", "encode", "decode", "frame",
    "FrameBuffer", "field_names", "PEER_MESSAGES", "ENGINE_REQUESTS",
    "RegisterPool", "PoolRegistered", "SendChunk", "RecvRoom", "PollRoom", "AbortRoom",
    "StatusRequest", "StatusReply", "Ok", "ErrorReply", "RoomEvent",
    "Heartbeat", "HeartbeatAck", "RankAnnounce", "EngineQuery", "EngineInfo", "PoolAnnounce",
    "PoolAck", "TransferRequest", "TransferStatus", "AbortTransfer", "AbortAck", "StagingGrant",
    "ChunkWritten",
    "RoomOutcome",
]
