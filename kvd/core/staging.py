"""The staged path, as pure code: which rooms can use it, how a room splits into chunks,
and the receiver's per-chunk ledger. No I/O, no torch (see :mod:`kvd.stagemem` for memory).

A staged room moves each receiver rank's KV in chunks of ``chunk_tokens`` room tokens.
For chunk ``c`` the receiver reserves one *region* of its staging pool, laid out
``[writer_0 block | writer_1 block | ...]``: one block per sender rank that writes to it,
in ascending sender-rank order, each block ``[buffer_0]..[buffer_{B-1}]`` of
``[tokens][num_heads][head_dim]`` (the ``kvd_kernels`` block layout). A sender gathers its
head slice of the chunk into its own staging, writes the block with one bulk write into
its slot of the region, and reports the chunk; once every writer has reported, the
receiver scatters the region into its pool and frees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvd.core.layout import PoolLayout
from kvd.core.planner import PlanError, TpMapping


class StagingError(PlanError):
    """A staged-path message that breaks the protocol (bad grant, chunk reported twice, ...)."""


@dataclass(frozen=True)
class StagedWriter:
    """One sender rank's share of a receiver's heads on the staged path."""

    sender_rank: int
    src_head_offset: int
    dst_head_offset: int
    num_heads: int


def staged_writers(mapping: TpMapping, receiver_rank: int) -> tuple[StagedWriter, ...] | None:
    """Writers of a receiver rank in region order, or None when the staged layout cannot
    express the mapping (a pair that needs several head runs, or writers of unequal width)."""
    writers = []
    for rank in mapping.required_senders(receiver_rank):
        slices = mapping.slices_between(rank, receiver_rank)
        if len(slices) != 1:
            return None
        s = slices[0]
        writers.append(StagedWriter(rank, s.src_head_offset, s.dst_head_offset, s.num_heads))
    if not writers or len({w.num_heads for w in writers}) != 1:
        return None
    return tuple(writers)


#: A same-TP room is staged only when its receiver pages fall into at least this many runs
#: (and the daemon's ``staging.same_tp_*`` limits say the runs are short and the room long).
FRAGMENTED_MIN_RUNS = 16


def page_runs(pages: Sequence[int] | np.ndarray) -> int:
    """How many runs of consecutive page indices ``pages`` holds (in order)."""
    arr = np.asarray(pages, dtype=np.int64).reshape(-1)
    return 0 if arr.size == 0 else 1 + int((np.diff(arr) != 1).sum())


#: A writer's block goes straight from its pool (no gather into the send ring) when its head
#: slice is the whole row and the chunk's tokens lie in at most this many runs (the default of
#: ``staging.ungathered_max_runs``): each run of each buffer is then one transport op of run x
#: row bytes (megabytes for a chunk of thousands of tokens), where the gather would copy every
#: byte once more before the same bulk write.
UNGATHERED_MAX_RUNS = 4


def ungathered_block_ops(tokens: np.ndarray, buffers: Sequence[int], token_bytes: int, dst: int,
                         max_runs: int = UNGATHERED_MAX_RUNS) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Transport ops ``(src, dst, lengths)`` that write a whole-row writer's block of chunk tokens
    ``tokens`` straight from its pool buffers (base addresses ``buffers``, rows of ``token_bytes``)
    to ``dst``, in the layout the gather kernel writes (per buffer a slab of the chunk's rows, in
    token order); None when the tokens fall in more than ``max_runs`` runs (gather them)."""
    idx = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if idx.size == 0 or not buffers:
        return None
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    if breaks.size + 1 > max_runs:
        return None
    starts = np.concatenate(([0], breaks)).astype(np.int64)          # run start inside the chunk
    lengths = np.diff(np.concatenate((starts, [idx.size]))).astype(np.int64)
    first = idx[starts]                                              # run's first pool row
    base = np.asarray(buffers, dtype=np.int64)[:, None]
    slab = np.arange(len(buffers), dtype=np.int64)[:, None] * (idx.size * token_bytes)
    src = (base + first[None, :] * token_bytes).reshape(-1)
    out = (dst + slab + starts[None, :] * token_bytes).reshape(-1)
    nbytes = np.broadcast_to(lengths[None, :] * token_bytes, (len(buffers), lengths.size)).reshape(-1)
    return src, out, np.ascontiguousarray(nbytes)


def staging_applies(sender: PoolLayout, receiver: PoolLayout, *, hisparse: bool,
                    dst_pages: Sequence[int] | np.ndarray | None = None, run_bytes: int = 0,
                    min_bytes: int = 0) -> str:
    """Why a room cannot take the staged path ('' when it can, both sides willing).

    Same TP stages only a long fragmented room (``dst_pages``, the receiver's pages: at least
    ``min_bytes`` per buffer, in ``FRAGMENTED_MIN_RUNS`` or more runs of under ``run_bytes``
    on average; 0: never): per-run writes cost one transport op each, where staging gathers
    them into bulk writes. Whole rows of long page runs are bulk writes already."""
    if sender.is_mla or receiver.is_mla:
        return "MLA: every receiver takes one sender's whole row (already bulk)"
    if hisparse:
        return "HiSparse writes tokens straight into the host pool"
    if sender.page_size != receiver.page_size:
        return "page sizes differ"
    if sender.tp_size == receiver.tp_size:
        runs = 0 if dst_pages is None else page_runs(dst_pages)
        pages = 0 if dst_pages is None else len(dst_pages)
        if runs < FRAGMENTED_MIN_RUNS or pages * receiver.page_bytes < min_bytes \
                or pages * receiver.page_bytes >= runs * run_bytes:
            return "same TP: whole rows of page runs are bulk writes already (pages not fragmented)"
    return ""


@dataclass(frozen=True)
class ChunkGeometry:
    """How one receiver rank's share of a room splits into staged chunks; both sides derive
    the same numbers from the request (tokens, chunk_tokens, writers) and their layouts."""

    total_tokens: int
    chunk_tokens: int
    num_writers: int
    block_bytes_per_token: int  # one writer: every buffer, its heads, one token

    def __post_init__(self) -> None:
        for name in ("total_tokens", "chunk_tokens", "num_writers", "block_bytes_per_token"):
            if getattr(self, name) < 1:
                raise StagingError(f"staged chunk geometry needs {name} >= 1, got {getattr(self, name)}")

    @property
    def num_chunks(self) -> int:
        return -(-self.total_tokens // self.chunk_tokens)

    def check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self.num_chunks:
            raise StagingError(f"chunk {chunk} outside the room's {self.num_chunks} chunks")

    def tokens(self, chunk: int) -> tuple[int, int]:
        """Room token range ``[start, end)`` of a chunk."""
        self.check_chunk(chunk)
        start = chunk * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.total_tokens)

    def block_bytes(self, chunk: int) -> int:
        start, end = self.tokens(chunk)
        return (end - start) * self.block_bytes_per_token

    def region_bytes(self, chunk: int) -> int:
        return self.block_bytes(chunk) * self.num_writers

    def slot(self, region_offset: int, chunk: int, writer: int) -> tuple[int, int]:
        """(offset, bytes) of one writer's block inside a chunk's region."""
        if not 0 <= writer < self.num_writers:
            raise StagingError(f"writer {writer} outside the chunk's {self.num_writers} writers")
        block = self.block_bytes(chunk)
        return region_offset + writer * block, block


def block_bytes_per_token(layout: PoolLayout, num_heads: int) -> int:
    return layout.num_buffers * num_heads * layout.head_dim * layout.itemsize


def plan_chunks(total_tokens: int, per_token: int, num_writers: int, *, max_tokens: int,
                max_region_bytes: int, page_size: int = 1) -> ChunkGeometry:
    """Chunk size for a room: at most ``max_tokens`` tokens and ``max_region_bytes`` per
    region, a whole number of pages when it can be, never less than one token."""
    if total_tokens < 1:
        raise StagingError("a staged room needs at least one token")
    by_bytes = max_region_bytes // (per_token * num_writers)
    tokens = min(max_tokens, by_bytes, total_tokens)
    if tokens >= page_size:
        tokens -= tokens % page_size
    if tokens < 1:
        raise StagingError(f"one token of {num_writers} writers ({per_token * num_writers} bytes) does "
                           f"not fit the {max_region_bytes}-byte staging region limit")
    return ChunkGeometry(total_tokens, tokens, num_writers, per_token)


def check_grant(geometry: ChunkGeometry, chunk: int, offset: int, staging_bytes: int) -> None:
    """A sender's check of a receiver's grant: the whole region lies in the announced pool."""
    geometry.check_chunk(chunk)
    size = geometry.region_bytes(chunk)
    if offset < 0 or offset + size > staging_bytes:
        raise StagingError(f"staging grant for chunk {chunk} at offset {offset} (+{size} bytes) falls "
                           f"outside the receiver's {staging_bytes}-byte staging pool")


@dataclass
class ChunkLedger:
    """Receiver side: which chunks are granted, which writers reported each, which are done.

    ``report`` raises StagingError for anything a correct sender never does: an unknown
    writer, a chunk never granted, a chunk reported twice, a block of the wrong size.
    """

    geometry: ChunkGeometry
    writer_ranks: tuple[int, ...]
    granted: dict[int, int] = field(default_factory=dict)  # chunk -> region offset
    reported: dict[int, set[int]] = field(default_factory=dict)  # chunk -> writer ranks
    scattered: set[int] = field(default_factory=set)
    next_grant: int = 0

    def grant(self, offset: int) -> int:
        """Record the next chunk's region; returns the chunk index."""
        chunk = self.next_grant
        self.geometry.check_chunk(chunk)
        self.granted[chunk] = offset
        self.next_grant += 1
        return chunk

    @property
    def all_granted(self) -> bool:
        return self.next_grant >= self.geometry.num_chunks

    @property
    def outstanding(self) -> int:
        """Granted chunks not yet scattered (their regions are still held)."""
        return len(self.granted) - len(self.scattered)

    def report(self, chunk: int, sender_rank: int, nbytes: int) -> bool:
        """Record one writer's block; True when the chunk is complete (ready to scatter)."""
        if sender_rank not in self.writer_ranks:
            raise StagingError(f"sender rank {sender_rank} is not a staged writer of this room")
        self.geometry.check_chunk(chunk)
        if chunk not in self.granted:
            raise StagingError(f"sender rank {sender_rank} reported chunk {chunk}, which was never granted")
        done = self.reported.setdefault(chunk, set())
        if sender_rank in done or chunk in self.scattered:
            raise StagingError(f"sender rank {sender_rank} reported chunk {chunk} twice")
        if nbytes != self.geometry.block_bytes(chunk):
            raise StagingError(f"sender rank {sender_rank} wrote {nbytes} bytes for chunk {chunk}, "
                               f"its block is {self.geometry.block_bytes(chunk)}")
        done.add(sender_rank)
        return len(done) == len(self.writer_ranks)

    def missing_from(self, sender_rank: int) -> list[int]:
        """Chunks a writer has not reported (checked when it says it is finished)."""
        return [c for c in range(self.geometry.num_chunks) if sender_rank not in self.reported.get(c, ())]

    def writer_index(self, sender_rank: int) -> int:
        return self.writer_ranks.index(sender_rank)

    @property
    def done(self) -> bool:
        return len(self.scattered) == self.geometry.num_chunks


__all__ = ["ChunkGeometry", "ChunkLedger", "StagedWriter", "StagingError", "block_bytes_per_token",
           "UNGATHERED_MAX_RUNS", "check_grant", "page_runs", "plan_chunks", "staged_writers", "staging_applies",
           "ungathered_block_ops"]
