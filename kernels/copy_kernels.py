"""Copy kernels of the same-node transport (kvd.transfer.router), on device addresses.

``copy_ops_triton``: a batch of arbitrary ``(src, dst, length)`` ops in one launch, cut into
pieces that spread over every SM (many small ops). ``copy_rows_triton``: a head slice straight
from one pool into another (rows at a stride, a run at an offset, per buffer; rows may be pages):
the one-pass path between TP sizes. Addresses must be device memory this process can reach (its
own, CUDA-IPC-opened, or a peer GPU's with peer access); callers check every range beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_kernels import _UNIT_DTYPES, SMALL_CHUNK_BYTES, _alignment, _device_table
from .upload import upload_indices

__all__ = ["copy_ops_triton", "copy_rows_key", "copy_rows_triton"]

_copy_hints = True
_likes: dict[tuple[int, str], torch.Tensor] = {}


def _like(unit: int, device: torch.device) -> torch.Tensor:
    """An empty tensor whose dtype tells a kernel its access unit (one per unit and device)."""
    key = (unit, str(device))
    like = _likes.get(key)
    if like is None:
        like = _likes[key] = torch.empty(0, dtype=_UNIT_DTYPES[unit], device=device)
    return like


# --- batched copies (the same-node transport's path for many ops) ------------------------------
@triton.jit
def _copy_pieces_kernel(  # type: ignore[no-untyped-def]
    src_table,  # *i64 [P]: byte address of each piece's source
    dst_table,  # *i64 [P]: byte address of each piece's destination
    len_table,  # *i64 [P]: units in each piece (<= PIECE)
    like,  # *unit: gives the element type
    PIECE: tl.constexpr,  # most units of one piece (power of two)
    ALIGN: tl.constexpr,  # bytes every address is a multiple of
):
    pid = tl.program_id(0)
    n = tl.load(len_table + pid)
    src = tl.load(src_table + pid).to(tl.pointer_type(like.dtype.element_ty))
    dst = tl.load(dst_table + pid).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGN > 1:
        src = tl.multiple_of(src, ALIGN)
        dst = tl.multiple_of(dst, ALIGN)
    cols = tl.arange(0, PIECE)
    mask = cols < n
    data = tl.load(src + cols, mask=mask, eviction_policy="evict_first")
    tl.store(dst + cols, data, mask=mask)


def copy_ops_triton(src: Sequence[int] | Any, dst: Sequence[int] | Any, length: Sequence[int] | Any,
                    device: torch.device, piece_bytes: int = 16384) -> int:
    """Copy ``length[i]`` bytes from device address ``src[i]`` to ``dst[i]`` for every op, in one launch
    on the current stream (asynchronous). Addresses must be device memory this process can access
    (its own, or CUDA-IPC-opened). Ops are cut into pieces of at most ``piece_bytes`` so that large
    and tiny ops alike spread over every SM. Returns the number of pieces launched."""
    import numpy as np

    s = np.asarray(src, dtype=np.int64)
    d = np.asarray(dst, dtype=np.int64)
    n = np.asarray(length, dtype=np.int64)
    keep = n > 0
    s, d, n = s[keep], d[keep], n[keep]
    if n.size == 0:
        return 0
    bits = int(np.bitwise_or.reduce(np.concatenate([s, d, n])))
    align = 16
    while bits % align:
        align //= 2
    unit = min(align, 4)
    piece = max(unit, min(piece_bytes, triton.next_power_of_2(int(n.max()))))
    counts = -(-n // piece)
    op = np.repeat(np.arange(n.size), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(op.size) - np.repeat(first, counts)
    off = k * piece
    ps, pd = s[op] + off, d[op] + off
    pn = np.minimum(n[op] - off, piece) // unit
    table = upload_indices([np.stack([ps, pd, pn])], device)[0].view(3, -1)
    like = _like(unit, device)
    units = piece // unit
    global _copy_hints
    warps = 8 if piece >= 8192 else 4
    if _copy_hints:
        try:
            _copy_pieces_kernel[(op.size,)](table[0], table[1], table[2], like, PIECE=units, ALIGN=align,
                                            num_warps=warps)
        except Exception:  # a Triton without alignment hints on scalar pointers: plain accesses
            _copy_hints = False
    if not _copy_hints:
        _copy_pieces_kernel[(op.size,)](table[0], table[1], table[2], like, PIECE=units, ALIGN=1,
                                        num_warps=warps)
    table.record_stream(torch.cuda.current_stream(device))
    return int(op.size)


# --- one-pass strided row copies (a head slice straight into a peer's pool) -------------------
@triton.jit
def _copy_rows_kernel(  # type: ignore[no-untyped-def]
    src_table,  # *i64 [B]: byte address of each source buffer
    dst_table,  # *i64 [B]: byte address of each destination buffer
    src_rows,  # *i64 [N]: row indices (each PAGE consecutive token rows)
    dst_rows,  # *i64 [N]
    like,  # *unit: gives the element type
    num_rows,  # T = N * PAGE token rows
    src_stride,  # units between source rows
    dst_stride,
    src_offset,  # units into a source row
    dst_offset,
    tiles,  # cdiv(T, BLOCK_T)
    NUM_BUFFERS: tl.constexpr,
    RUN: tl.constexpr,  # units copied per row
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of two >= RUN
    ALIGN: tl.constexpr,  # bytes every run start is a multiple of
    STREAM: tl.constexpr = False,  # streaming stores and evict-first loads (bytes touched once)
    PAGE: tl.constexpr = 1,  # token rows per index
    BUFFER_MAJOR: tl.constexpr = False,  # consecutive programs take consecutive tiles of one buffer
):
    """Grid order: a batch that may sit in L2 goes buffer-fastest (SGLang's order); a large one
    buffer-major, which keeps strided head slices at 0.95 of ``copy_`` on the H100 where the
    buffer-fastest order ran them at 0.36-0.64 (``tools/bench_copy_rows.py``)."""
    pid = tl.program_id(0)
    if BUFFER_MAJOR:
        buf = pid // tiles
        tile = pid % tiles
    else:
        tile = pid // NUM_BUFFERS
        buf = pid % NUM_BUFFERS
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_batch = t < num_rows
    if PAGE == 1:
        s_row = tl.load(src_rows + t, mask=in_batch, other=0).to(tl.int64)
        d_row = tl.load(dst_rows + t, mask=in_batch, other=0).to(tl.int64)
    else:
        idx = t // PAGE
        within = (t % PAGE).to(tl.int64)
        s_row = tl.load(src_rows + idx, mask=in_batch, other=0).to(tl.int64) * PAGE + within
        d_row = tl.load(dst_rows + idx, mask=in_batch, other=0).to(tl.int64) * PAGE + within
    src = tl.load(src_table + buf).to(tl.pointer_type(like.dtype.element_ty))
    dst = tl.load(dst_table + buf).to(tl.pointer_type(like.dtype.element_ty))
    cols = tl.arange(0, BLOCK_R)
    src_ptrs = src + (s_row * src_stride + src_offset)[:, None] + cols[None, :]
    dst_ptrs = dst + (d_row * dst_stride + dst_offset)[:, None] + cols[None, :]
    src_ptrs = tl.multiple_of(src_ptrs, [1, ALIGN])
    dst_ptrs = tl.multiple_of(dst_ptrs, [1, ALIGN])
    if RUN == BLOCK_R:  # noqa: SIM108 - a compile-time branch, kept plain for the Triton frontend
        mask = in_batch[:, None]
    else:
        mask = in_batch[:, None] & (cols < RUN)[None, :]
    if STREAM:
        data = tl.load(src_ptrs, mask=mask, eviction_policy="evict_first")
        tl.store(dst_ptrs, data, mask=mask, cache_modifier=".cs")
    else:
        data = tl.load(src_ptrs, mask=mask)
        tl.store(dst_ptrs, data, mask=mask)


@dataclass(frozen=True)
class _RowsLaunch:
    """How :func:`copy_rows_triton` launches one row copy: tile shape and constants."""

    align: int
    unit: int
    row_units: int
    large: bool
    block_t: int
    tiles: int
    num_warps: int
    ints: tuple[int, ...]  # the kernel's integer arguments

    @classmethod
    def of(cls, src_bases: Sequence[int], dst_bases: Sequence[int], num_rows: int, src_stride: int,
           dst_stride: int, src_offset: int, dst_offset: int, run: int, rows_per_index: int,
           block_bytes: int = 0) -> _RowsLaunch:
        align = _alignment([*src_bases, *dst_bases, src_stride, dst_stride, src_offset, dst_offset, run])
        unit = min(align, 4)
        row_units = triton.next_power_of_2(run // unit)
        # A batch that may sit in L2 runs 16 KiB tiles with 8 warps and no hints (the staging
        # kernels' sweeps, tools/bench_gpu_kernels.py); a larger one 4 KiB tiles, 8 warps,
        # streaming, buffer-major (an H100 sweep of order x tile x warps x hints over head slices
        # of 256-2,048-byte runs: 0.95-1.1 of ``copy_`` at every shape, the best or within 2 %).
        large = num_rows * len(src_bases) * run > SMALL_CHUNK_BYTES
        tokens = max(1, (block_bytes or (4096 if large else 16384)) // (row_units * unit))
        block_t = max(1, min(triton.next_power_of_2(num_rows), tokens, 1024))
        tiles = triton.cdiv(num_rows, block_t)
        warps = 8 if large or block_t * row_units * unit >= 8192 else 4
        ints = (num_rows, src_stride // unit, dst_stride // unit, src_offset // unit, dst_offset // unit, tiles)
        return cls(align, unit, row_units, large, block_t, tiles, warps, ints)

    def key(self, num_buffers: int, run: int, rows_per_index: int) -> tuple[int, ...]:
        """What a compiled kernel is specialised on: the constants, and for each integer
        argument what Triton specialises it by (equal to 1, divisible by 16, 32 or 64 bits)."""
        return (num_buffers, run // self.unit, self.block_t, self.row_units, self.align, self.large, rows_per_index,
                self.num_warps, *(v == 1 for v in self.ints), *(v % 16 == 0 for v in self.ints),
                *(v >= 1 << 31 for v in self.ints))


def copy_rows_key(src_bases: Sequence[int], dst_bases: Sequence[int], num_rows: int, src_stride: int,
                  dst_stride: int, src_offset: int, dst_offset: int, run: int, rows_per_index: int = 1) -> tuple[int, ...]:
    """The compile key of a :func:`copy_rows_triton` call (``num_rows`` token rows): two calls
    with one key run the same compiled kernel, so a caller that must not wait for a compile (an
    event loop) launches only keys it has launched before."""
    return _RowsLaunch.of(src_bases, dst_bases, num_rows, src_stride, dst_stride, src_offset, dst_offset, run,
                          rows_per_index).key(len(src_bases), run, rows_per_index)


def copy_rows_triton(src_bases: Sequence[int], dst_bases: Sequence[int], src_rows: Any, dst_rows: Any,
                     src_stride: int, dst_stride: int, src_offset: int, dst_offset: int, run: int,
                     device: torch.device, block_bytes: int = 0, rows_per_index: int = 1,
                     buffer_major: bool | None = None) -> None:
    """For every buffer ``b`` and row ``i``: copy ``run`` bytes from ``src_bases[b] + src_rows[i] *
    src_stride + src_offset`` to ``dst_bases[b] + dst_rows[i] * dst_stride + dst_offset``, in one
    launch on the current stream (asynchronous). With ``rows_per_index`` k > 1 each index ``p``
    stands for the k rows ``p*k .. p*k+k-1`` on both sides (pages). Addresses are device memory this process can
    reach (its own, CUDA-IPC-opened, or a peer GPU's with peer access); rows are int64 arrays
    (host: uploaded here; or tensors on ``device``). The caller has checked every span.
    ``block_bytes`` and ``buffer_major`` override the launch's own tile and grid order (for
    benchmarks)."""
    if len(src_bases) != len(dst_bases):
        raise ValueError(f"{len(src_bases)} source buffers but {len(dst_bases)} destination buffers")
    if isinstance(src_rows, torch.Tensor) or isinstance(dst_rows, torch.Tensor):
        rows = [torch.as_tensor(r).to(device=device, dtype=torch.int64) for r in (src_rows, dst_rows)]
    else:
        rows = upload_indices([src_rows, dst_rows], device)
    if rows[0].numel() != rows[1].numel():
        raise ValueError(f"{rows[0].numel()} source rows but {rows[1].numel()} destination rows")
    num_rows = rows[0].numel() * rows_per_index
    if num_rows == 0 or not src_bases:
        return
    cfg = _RowsLaunch.of(src_bases, dst_bases, num_rows, src_stride, dst_stride, src_offset, dst_offset, run,
                         rows_per_index, block_bytes)
    unit = cfg.unit
    _copy_rows_kernel[(cfg.tiles * len(src_bases),)](
        _device_table(list(src_bases), device), _device_table(list(dst_bases), device), rows[0], rows[1],
        _like(unit, device), num_rows, src_stride // unit, dst_stride // unit, src_offset // unit, dst_offset // unit,
        cfg.tiles, NUM_BUFFERS=len(src_bases), RUN=run // unit, BLOCK_T=cfg.block_t, BLOCK_R=cfg.row_units,
        ALIGN=cfg.align, STREAM=cfg.large, PAGE=rows_per_index,
        BUFFER_MAJOR=cfg.large if buffer_major is None else buffer_major, num_warps=cfg.num_warps,
    )
    if device.type == "cuda":
        for r in rows:
            r.record_stream(torch.cuda.current_stream(device))
