"""The records of a room on either side: plain data the side modules and pipelines share.

No behaviour beyond small derived values: what happens to a room is decided in
:mod:`kvd.sides.sender`, :mod:`kvd.sides.receiver`, their staged pipelines, and the
state machine of :mod:`kvd.core.rooms`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvd.core.planner import DirectPlanner, HeadSlice, pages_to_tokens
from kvd.core.ring import RingSlot
from kvd.core.rooms import CompletionTracker, RoomMachine, TransferPath
from kvd.core.rows import Plan
from kvd.core.staging import ChunkGeometry, ChunkLedger, StagedWriter
from kvd.mem.pools import LocalPool, RemotePool
from kvd.wire import peer as wp

if TYPE_CHECKING:
    from kvd.mem.stagemem import StagingPool


# --- prefill side ----------------------------------------------------------------------------

@dataclass
class StagedSend:
    """A request on the staged path: chunk geometry, the receiver's grants, progress."""

    geometry: ChunkGeometry
    writer: int
    grants: dict[int, int] = field(default_factory=dict)  # chunk -> region offset at the receiver
    # Every grant taken (written chunks too), so that a duplicated grant is told from a conflicting one.
    granted: dict[int, int] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    done: bool = False
    chunks_written: int = 0
    not_gathering: asyncio.Event = field(default_factory=asyncio.Event)  # set: no kernel reads the pool

    def __post_init__(self) -> None:
        self.not_gathering.set()


@dataclass
class ReceiverRequest:
    """One decode rank's request to this sender for a room."""

    msg: wp.TransferRequest
    remote: RemotePool
    slices: tuple[HeadSlice, ...]
    dst_cursor: int = 0  # pages (or HiSparse tokens) of dst_indices already written
    bytes_written: int = 0  # into this receiver (a sender rank may serve several)
    aborted: bool = False
    reported: bool = False
    outcome: bool | None = None  # the receiver's verdict (requests with msg.confirms wait for it)
    unsure: bool = False  # a write to this receiver failed mid-flight: its bytes may still land
    staged: StagedSend | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # fence of this request's staged writes
    planners: tuple[DirectPlanner, ...] = ()  # one per head slice (shared by the pair of pools)
    # Inline bytes of the last batch, held for the final status (kvd.core.inline).
    inline_ops: bytes = b""
    inline_data: bytes = b""
    inline_total: int = 0  # inline bytes put in statuses to this receiver (the held ones included)

    @property
    def dummy(self) -> bool:
        return not self.slices


@dataclass
class Chunk:
    pages: np.ndarray
    is_last: bool
    aux: bytes
    # Chunks planned as one (a burst): pages of the chunks before the final one, whose every
    # token must fit the receiver even where the final chunk may end short (HiSparse).
    lead_pages: int = 0


@dataclass
class SenderRoom:
    pool: LocalPool
    room: int
    machine: RoomMachine
    requests: dict[tuple[str, int], ReceiverRequest] = field(default_factory=dict)
    expected: int | None = None
    chunks: list[Chunk] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    got_last: bool = False
    src_pages_done: int = 0
    pages_received: int = 0
    bytes_done: int = 0
    aux: bytes = b""
    path: TransferPath = TransferPath.DIRECT
    engine_told: bool = False
    #: The receiver gave this room up before the engine started it, (reason, its daemons, until
    #: when): the engine's first chunk may be that room (it fails at ``until``) or a reuse of the
    #: id (a request from each of those daemons comes by then and clears this).
    given_up: tuple[str, frozenset[str], float] | None = None
    direct_done: bool = False  # every chunk of the per-slice requests is written
    # Chunks planned by DirectSender.drain_now that need transport writes: the drain task's first.
    handoff: tuple[list[Chunk], list[tuple[ReceiverRequest, Plan]]] | None = None
    # Set when a chunk arrives: a drain waiting on a write plans it meanwhile.
    more: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False  # a drain task is spawned or running: it takes every chunk that comes
    # The engine's pages so far; expanded to tokens only when the staged path asks (a direct
    # room never pays for the expansion on the event loop).
    src_pages: list[np.ndarray] = field(default_factory=list)
    src_token_count: int = 0
    _src_tokens: np.ndarray | None = None

    @property
    def bytes_total(self) -> int:
        return self.bytes_done  # a sender learns the total only when its last chunk is written

    def tokens_upto(self, end: int) -> np.ndarray:
        """The room's first ``end`` source tokens (the engine's chunks, expanded once per chunk
        that arrived since the last call)."""
        have = 0 if self._src_tokens is None else self._src_tokens.shape[0]
        if have < self.src_token_count:
            if len(self.src_pages) > 1:
                self.src_pages = [np.concatenate(self.src_pages)]
            self._src_tokens = pages_to_tokens(self.src_pages[0], self.pool.layout.page_size)
        assert self._src_tokens is not None
        return self._src_tokens[:end]

    def staged(self) -> list[tuple[ReceiverRequest, StagedSend]]:
        return [(r, r.staged) for r in self.requests.values() if r.staged is not None]

    @property
    def key(self) -> tuple[int, int]:
        return (self.pool.pool_id, self.room)


# --- decode side -----------------------------------------------------------------------------

@dataclass
class SenderLink:
    rank: int
    daemon: str
    dummy: bool
    final: bool = False      # sent a final status: it will write nothing more
    aborted: bool = False    # we sent it an AbortTransfer for the room
    acked: bool = False      # answered our abort
    revoked: bool = False    # its daemon's receive session was revoked: nothing of it can land
    unsure: bool = False     # it said a failed write of its may still land: only revocation fences it
    bytes_written: int = 0
    bytes_owed: int = 0      # what its head slices of every token and buffer come to
    inline_bytes: int = 0    # of those, copied here from its statuses (kvd.core.inline)
    progress_statuses: int = 0  # non-final statuses that reported new bytes (each restarts the deadline)
    asked_again: bool = False  # its daemon did not know our pool: announced again and asked once more
    # The bytes of each token row its head slices cover ((start, end), ...); None: the whole row.
    row_ranges: tuple[tuple[int, int], ...] | None = None

    @property
    def may_write(self) -> bool:
        """Whether a write of this sender into the room's pages could still land."""
        if self.dummy or self.revoked:
            return False
        return not (self.final or self.acked) or self.unsure


@dataclass
class StagedReceive:
    """A room on the staged path: its writers, chunk ledger and the regions it holds."""

    writers: tuple[StagedWriter, ...]
    ledger: ChunkLedger
    stage: StagingPool
    dst_tokens: np.ndarray
    slots: dict[int, RingSlot] = field(default_factory=dict)  # chunk -> receive-ring region
    landed: dict[int, int] = field(default_factory=dict)  # chunk -> bytes peers wrote into it
    scattering: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Until a writer reports its first chunk the room is "unstarted": it holds one region, and
    # its sender daemons' unstarted rooms share at most half the ring (kvd.sides.staged_recv).
    started: bool = False
    unstarted_bytes: int = 0  # ring bytes this room holds while unstarted (counted per peer)


@dataclass
class ReceiverRoom:
    pool: LocalPool
    room: int
    transfer_id: int
    machine: RoomMachine
    dst_indices: np.ndarray
    bootstrap_addr: str
    prefill_engine_id: str
    hisparse: bool
    bytes_total: int = 0
    senders: dict[int, SenderLink] = field(default_factory=dict)
    tracker: CompletionTracker | None = None
    aux: bytes = b""
    released: bool = False
    failed_at: float | None = None  # the abort fence runs from here
    path: TransferPath = TransferPath.DIRECT  # decided once, at bootstrap
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # bootstrap, grants: cancelled at release
    staged: StagedReceive | None = None
    inline_max_bytes: int = 0  # what this room asked its senders for (TransferRequest)
    requested: bool = False  # its TransferRequests went out

    @property
    def bytes_done(self) -> int:
        return sum(s.bytes_written for s in self.senders.values())

    def peers(self) -> set[str]:
        return {s.daemon for s in self.senders.values()}


__all__ = ["StagedSend", "ReceiverRequest", "Chunk", "SenderRoom", "SenderLink", "StagedReceive",
           "ReceiverRoom"]
