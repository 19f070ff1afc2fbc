"""A head slice of a chunk as one strided row copy, not a list of per-token ops.

Between different TP sizes each token's head slice is its own small write (256 B - 4 KiB):
a 128k-token room from one sender rank is millions of ops once expanded. :class:`RowCopy`
keeps the plan in its natural form instead: for every buffer ``b`` and row ``i``, copy
``run`` bytes from ``src_bases[b] + src_rows[i] * src_stride + src_offset`` to
``dst_bases[b] + dst_rows[i] * dst_stride + dst_offset``. A transport that can run it as
one kernel (the same-node path: the receiver's pool is mapped here over CUDA IPC) moves the
slice in one pass, with no staging; any other transport gets :meth:`RowBatch.ops`, exactly
the per-slice ops the planner always made.

Bounds are checked on spans: each buffer's rows, lowest to highest, must lie inside one
registered region. That covers every op the batch stands for (a stronger test than per-op).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kvd.core.planner import DirectPlanner, PlanError, RegionIndex, WriteOps, check_ranges_within, coalesce

__all__ = ["Plan", "RowBatch", "RowCopy", "check_rows_within", "join_plans", "plan_slice", "plan_slice_pages"]


@dataclass(frozen=True, eq=False)
class RowCopy:
    """``run`` bytes of every (buffer, row): see the module docstring. Rows are token indices."""

    src_bases: np.ndarray  # int64 [B]: this daemon's buffer addresses
    dst_bases: np.ndarray  # int64 [B]: the peer's buffer addresses (its address space)
    src_rows: np.ndarray  # int64 [T]
    dst_rows: np.ndarray  # int64 [T]
    src_stride: int
    dst_stride: int
    src_offset: int
    dst_offset: int
    run: int
    # Token rows per index: 1 (rows are tokens), or the page size (rows are pages, each
    # ``rows_per_index`` consecutive token rows on both sides: 1/page_size the planning).
    rows_per_index: int = 1

    def __post_init__(self) -> None:
        if self.rows_per_index < 1:
            raise PlanError(f"row copy of {self.rows_per_index} rows per index")
        if self.src_bases.shape != self.dst_bases.shape or self.src_rows.shape != self.dst_rows.shape:
            raise PlanError(f"row copy of unequal shapes: {self.src_bases.shape[0]} / {self.dst_bases.shape[0]} "
                            f"buffers, {self.src_rows.shape[0]} / {self.dst_rows.shape[0]} rows")
        if self.run < 1 or self.src_offset < 0 or self.dst_offset < 0 \
                or self.src_offset + self.run > self.src_stride or self.dst_offset + self.run > self.dst_stride:
            raise PlanError(f"row copy run {self.run} at offsets {self.src_offset}/{self.dst_offset} does not fit "
                            f"rows of {self.src_stride}/{self.dst_stride} bytes")

    def __len__(self) -> int:
        return int(self.src_bases.shape[0] * self.src_rows.shape[0] * self.rows_per_index)

    def token_rows(self, side: str) -> np.ndarray:
        """The token rows of ``side`` ("src" or "dst"), one per op of a buffer."""
        idx = self.src_rows if side == "src" else self.dst_rows
        k = self.rows_per_index
        if k == 1:
            return idx
        return (idx[:, None] * k + np.arange(k, dtype=np.int64)[None, :]).reshape(-1)

    @property
    def total_bytes(self) -> int:
        return len(self) * self.run

    def ops(self) -> WriteOps:
        """The same copy as per-row ops, grouped by buffer (what the planner made before)."""
        src_off = self.token_rows("src") * self.src_stride + self.src_offset
        dst_off = self.token_rows("dst") * self.dst_stride + self.dst_offset
        return WriteOps((self.src_bases[:, None] + src_off[None, :]).reshape(-1),
                        (self.dst_bases[:, None] + dst_off[None, :]).reshape(-1),
                        np.full(len(self), self.run, dtype=np.int64))

    def spans(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """Per buffer, the byte range from its lowest row's run to its highest row's end."""
        bases, rows, stride, offset = (self.src_bases, self.src_rows, self.src_stride, self.src_offset) \
            if side == "src" else (self.dst_bases, self.dst_rows, self.dst_stride, self.dst_offset)
        if rows.size == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        k = self.rows_per_index
        lo, hi = int(rows.min()) * k, int(rows.max()) * k + k - 1
        if lo < 0:
            raise PlanError(f"row copy: negative {side} row {lo}")
        start = bases + (lo * stride + offset)
        return start, np.full(bases.shape[0], (hi - lo) * stride + self.run, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class RowBatch:
    """Every row copy one batch holds (a chunk's slices for one receiver, or several chunks')."""

    parts: tuple[RowCopy, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def total_bytes(self) -> int:
        return sum(p.total_bytes for p in self.parts)

    def ops(self) -> WriteOps:
        return WriteOps.concat(p.ops() for p in self.parts)


def check_rows_within(batch: RowBatch, regions: Sequence[tuple[int, int]] | RegionIndex, what: str, *,
                      side: str = "dst") -> None:
    """Refuse a batch any of whose buffer spans on ``side`` leaves the registered regions."""
    if side not in ("src", "dst"):
        raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
    for part in batch.parts:
        addresses, lengths = part.spans(side)
        check_ranges_within(addresses, lengths, regions, what)


def _merge(copies: Iterable[RowCopy]) -> tuple[RowCopy, ...]:
    """Copies of the same slice (same buffers, strides, offsets: one planner's chunks) as one
    copy of all their rows: one kernel launch per batch, not per chunk."""
    merged: list[list[RowCopy]] = []
    for c in copies:
        for group in merged:
            g = group[0]
            if (g.src_bases is c.src_bases or np.array_equal(g.src_bases, c.src_bases)) \
                    and (g.dst_bases is c.dst_bases or np.array_equal(g.dst_bases, c.dst_bases)) \
                    and (g.src_stride, g.dst_stride, g.src_offset, g.dst_offset, g.run, g.rows_per_index) \
                    == (c.src_stride, c.dst_stride, c.src_offset, c.dst_offset, c.run, c.rows_per_index):
                group.append(c)
                break
        else:
            merged.append([c])
    return tuple(g[0] if len(g) == 1 else RowCopy(g[0].src_bases, g[0].dst_bases,
                                                  np.concatenate([c.src_rows for c in g]),
                                                  np.concatenate([c.dst_rows for c in g]),
                                                  g[0].src_stride, g[0].dst_stride, g[0].src_offset,
                                                  g[0].dst_offset, g[0].run, g[0].rows_per_index) for g in merged)


def join_plans(parts: Iterable[WriteOps | RowBatch]) -> WriteOps | RowBatch:
    """One batch of several plans for the same receiver: row copies stay rows; ops stay ops,
    coalesced where they continue one another (a mix, which no planner makes, is expanded)."""
    parts = list(parts)
    if parts and all(isinstance(p, RowBatch) for p in parts):
        return RowBatch(_merge(c for p in parts if isinstance(p, RowBatch) for c in p.parts))
    if len(parts) == 1 and isinstance(parts[0], WriteOps):
        return parts[0]
    return coalesce(WriteOps.concat(p.ops() if isinstance(p, RowBatch) else p for p in parts))


def plan_slice(planner: DirectPlanner, src_tokens: np.ndarray, dst_tokens: np.ndarray) -> WriteOps | RowBatch:
    """:meth:`DirectPlanner.plan`, with a strided head slice kept as one row copy (whole rows,
    already merged into runs, stay ops)."""
    if planner.full_row:
        return planner.plan(src_tokens, dst_tokens)
    src, dst = planner.checked_tokens(src_tokens, dst_tokens)
    if src.size == 0:
        return WriteOps.empty()
    return _slice_copy(planner, src, dst, 1)


def plan_slice_pages(planner: DirectPlanner, src_pages: np.ndarray, dst_pages: np.ndarray) -> Plan:
    """:func:`plan_slice` on page indices (equal page sizes): whole rows as merged ops, a strided
    slice as one row copy whose rows are pages."""
    if planner.full_row:
        return planner.plan_pages(src_pages, dst_pages)
    src, dst = planner.checked_pages(src_pages, dst_pages)
    if src.size == 0:
        return WriteOps.empty()
    return _slice_copy(planner, src, dst, planner.sender.page_size)


def _slice_copy(planner: DirectPlanner, src: np.ndarray, dst: np.ndarray, rows_per_index: int) -> RowBatch:
    sender, receiver, hs = planner.sender, planner.receiver, planner.head_slice
    return RowBatch((RowCopy(planner.sbufs, planner.rbufs, src, dst, sender.token_bytes, receiver.token_bytes,
                             hs.src_head_offset * sender.head_bytes, hs.dst_head_offset * receiver.head_bytes,
                             hs.num_heads * sender.head_bytes, rows_per_index),))


#: What the sender writes to one receiver in one batch: ops, or row copies.
Plan = WriteOps | RowBatch
