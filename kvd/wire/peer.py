"""Messages between kvd daemons (ZMQ): directory, pool announce, transfers, aborts, staging.

Every peer message starts with ``src`` (the sending daemon's address, so replies and heartbeats
can be routed) and ``token`` (the shared auth token). Both are required on the wire, as they
always were, but default to "" in Python: call sites build a message without them and the peer
hub stamps them once, with :func:`stamped`, just before it encodes.

Every peer message ends with ``incarnation`` (appended in revision 2): a random id the sending
daemon draws at each start. A daemon restarted on the same address is a new incarnation, and
its peers drop what the old one told them (announced pools, directory entries, cached engine
topology) instead of trusting it. An older peer sends "" (unknown: nothing is dropped). The hub
stamps it too. Fields a message gains later go *after* it.

Declarations only: each class is a frozen dataclass whose annotations are its wire fields, in
wire order; append new fields at the end with ``wire(default, since=PROTOCOL_VERSION)``. TYPE
numbers are forever. This module never touches a socket, asyncio, zmq or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from kvd.wire.codec import Message
from kvd.wire.fields import Indices, Map, wire


@dataclass(frozen=True, eq=False, kw_only=True)
class PeerMessage(Message):
    """Base of the daemon <-> daemon messages (no TYPE of its own, never sent as such)."""

    src: str = wire("", required_on_wire=True)
    token: str = wire("", required_on_wire=True)


P = TypeVar("P", bound=PeerMessage)


def stamped(msg: P, src: str, token: str, incarnation: str = "") -> P:
    """``msg`` from daemon ``src`` (started as ``incarnation``) with auth ``token``: what the
    peer hub sends."""
    # A field-for-field copy with the three fields set: what dataclasses.replace would build,
    # without re-running __init__ and its checks for values this daemon's own config holds (a
    # peer hub stamps every message it sends: issue 15's per-message cost).
    out = object.__new__(type(msg))
    fields = out.__dict__
    fields.update(msg.__dict__)
    fields["src"], fields["token"] = src, token
    if incarnation:
        fields["incarnation"] = incarnation  # every concrete peer message declares it
    return out


@dataclass(frozen=True, eq=False, kw_only=True)
class Heartbeat(PeerMessage):
    """Liveness ping; answered by HeartbeatAck."""

    TYPE = 32
    nonce: int
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class HeartbeatAck(PeerMessage):
    """Answer to Heartbeat."""

    TYPE = 33
    nonce: int
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class RankAnnounce(PeerMessage):
    """A daemon tells an engine's directory daemon that it serves one prefill rank."""

    TYPE = 34
    layout: Map
    # The announced rank's pool (a withdraw names it, so a newer registration of the rank stays).
    pool_key: str = wire("", since=2)
    # The rank's pool is gone: the directory forgets the rank (an older directory ignores it).
    withdraw: bool = wire(False, since=2)
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class EngineQuery(PeerMessage):
    """Decode daemon -> directory: topology of a prefill engine."""

    TYPE = 35
    engine_id: str
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class EngineInfo(PeerMessage):
    """Directory -> decode daemon: per prefill rank its layout and serving daemon (ready only
    once every rank has registered, like SGLang's 503-until-complete)."""

    TYPE = 36
    engine_id: str
    ready: bool
    tp_size: int
    layouts: list[Map]
    daemons: list[str]
    error: str = ""
    # The ranks disagree on the layout: the asker's rooms fail at once (an older directory
    # leaves it False; its rooms then fail at their deadline).
    conflict: bool = wire(False, since=2)
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class PoolAnnounce(PeerMessage):
    """Decode daemon -> prefill daemon, once per (decode pool, prefill engine): the receiver's
    layout and registered buffer addresses, so per-room requests stay small. A receiver with
    a staging pool names its registered range (``staging_bytes`` 0: none, or an older peer)."""

    TYPE = 37
    pool_key: str
    layout: Map
    buffers: list[int]
    session_id: str
    prefill_engine_id: str
    staging_base: int = wire(0, since=2)
    staging_bytes: int = wire(0, since=2)
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class PoolAck(PeerMessage):
    """Prefill daemon accepts (or refuses, naming both layouts) a decode pool. ``staging``:
    it will take the staged path for this pool (an older peer leaves it False: per-slice)."""

    TYPE = 38
    pool_key: str
    ok: bool
    error: str = ""
    staging: bool = wire(False, since=2)
    # Bytes of the prefill daemon's send ring: a staged chunk's block must fit in it (0: an
    # older peer, whose ring is assumed to hold the receiver's chunks as it always did).
    send_ring_bytes: int = wire(0, since=2)
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)
    # The sender daemon reaches this pool on the same machine, GPU to GPU: it can write a
    # strided head slice straight into it in one pass, so the receiver need not stage.
    one_pass: bool = wire(False, since=4)
    # Not an answer to an announce: the prefill daemon forgot this pool (no room used it for a
    # while, or the announcer has too many): the receiver announces it again before its next room.
    forgotten: bool = wire(False, since=5)


@dataclass(frozen=True, eq=False, kw_only=True)
class TransferRequest(PeerMessage):
    """Decode -> prefill, per room and sender rank: where to write (page indices, or token
    indices into a HiSparse host pool). A dummy request has nothing to write; it only lets
    a replica sender finish. transfer_id tells a reused room id's transfers apart.

    ``chunk_tokens`` > 0 asks for the staged path: the room goes in chunks of that many
    tokens, this sender's block is number ``writer`` of ``writers`` in each chunk's region,
    and each region's offset follows in a StagingGrant."""

    TYPE = 39
    room: int
    transfer_id: int
    pool_key: str
    prefill_engine_id: str
    sender_rank: int
    dst_indices: Indices
    dummy: bool
    deadline_s: float
    enable_hisparse: bool = wire(False, since=2)
    chunk_tokens: int = wire(0, since=2)
    writer: int = wire(0, since=2)
    writers: int = wire(0, since=2)
    # The receiver will send a RoomOutcome: the sender tells its engine success only on a
    # successful outcome (an older receiver leaves it False: the sender's own view decides).
    confirms: bool = wire(False, since=2)
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)
    # The receiver writes up to this many bytes per status itself, from the status (inline):
    # a tiny room then costs no transport write. 0 (an older receiver, a GPU pool): never.
    inline_max_bytes: int = wire(0, since=3)


@dataclass(frozen=True, eq=False, kw_only=True)
class TransferStatus(PeerMessage):
    """Prefill -> decode: a sender rank finished writing a room (or failed, with the reason).
    Non-final statuses report progress (bytes written so far)."""

    TYPE = 40
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    ok: bool
    reason: str = ""
    aux: bytes = b""
    bytes_written: int = 0
    final: bool = True
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)
    # A write of this sender may still land (one failed or timed out mid-flight): the receiver
    # must fence it off (revoke its session) before releasing the pages, not trust this report.
    unsure: bool = wire(False, since=2)
    # Inline bytes (see TransferRequest.inline_max_bytes): ``inline_ops`` is little-endian int64
    # (destination address, length) pairs into the receiver's pool, ``inline_data`` their bytes
    # in order. Counted in ``bytes_written``.
    inline_ops: bytes = wire(b"", since=3)
    inline_data: bytes = wire(b"", since=3)
    # A refused request whose decode pool the sender daemon does not know (never announced to
    # it, forgotten as idle, or it restarted since): the receiver announces the pool again and
    # asks once more, instead of failing the room.
    pool_unknown: bool = wire(False, since=5)
    # Of ``bytes_written``, the inline bytes this sender's statuses to this receiver have carried,
    # this one's included (-1: a sender of an older release, which does not say). Statuses can be
    # lost (a full peer queue, a reconnect): a lost one with inline bytes must fail the room,
    # never let it succeed with those rows unwritten.
    inline_total: int = wire(-1, since=7)


@dataclass(frozen=True, eq=False, kw_only=True)
class AbortTransfer(PeerMessage):
    """Decode -> prefill: stop writing this room; answer AbortAck once no write can land."""

    TYPE = 41
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    reason: str = ""
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)
    # Set only when the room never sent this sender its TransferRequest (it failed while
    # bootstrapping): the sender finds the engine's room by engine id, rank and room id, and
    # fails it unless another daemon asked for it, instead of holding the engine's pages until
    # its waiting deadline.
    prefill_engine_id: str = wire("", since=7)


@dataclass(frozen=True, eq=False, kw_only=True)
class AbortAck(PeerMessage):
    """Prefill -> decode: every write of the room has finished or will never be issued."""

    TYPE = 42
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)
    # As in TransferStatus: a failed write of the room may still land; fence before release.
    unsure: bool = wire(False, since=2)


@dataclass(frozen=True, eq=False, kw_only=True)
class StagingGrant(PeerMessage):
    """Decode -> prefill (staged path): chunk ``chunk``'s region starts at ``offset`` in the
    receiver's staging pool. Sent as space frees up, a few chunks ahead of the writes."""

    TYPE = 43
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    chunk: int
    offset: int
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class ChunkWritten(PeerMessage):
    """Prefill -> decode (staged path): this sender's block of a chunk has landed."""

    TYPE = 44
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    chunk: int
    nbytes: int
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


@dataclass(frozen=True, eq=False, kw_only=True)
class RoomOutcome(PeerMessage):
    """Decode -> prefill, once per sender rank when a room ends: the receiver's verdict, so the
    prefill engine never hears success for a room its receiver failed."""

    TYPE = 45
    room: int
    transfer_id: int
    pool_key: str
    sender_rank: int
    ok: bool
    reason: str = ""
    incarnation: str = wire("", since=2)  # the sender daemon's start (see the module docstring)


PEER_MESSAGES = (Heartbeat, HeartbeatAck, RankAnnounce, EngineQuery, EngineInfo, PoolAnnounce,
                 PoolAck, TransferRequest, TransferStatus, AbortTransfer, AbortAck, StagingGrant,
                 ChunkWritten, RoomOutcome)

__all__ = ["PEER_MESSAGES", "AbortAck", "AbortTransfer", "ChunkWritten", "EngineInfo", "EngineQuery",
           "Heartbeat", "HeartbeatAck", "PeerMessage", "PoolAck", "PoolAnnounce", "RankAnnounce", "RoomOutcome",
           "StagingGrant", "TransferRequest", "TransferStatus", "stamped"]
