"""Plain torch gather/scatter between KV pool buffers and one writer's staging block.

This is the definition the Triton kernels are tested against, and the path used for host
(CPU) pools. Staging block layout for one writer and one chunk of ``T`` tokens:
``[buffer_0][buffer_1]...[buffer_{B-1}]`` in pool order (K layers, then V layers; MLA: one
buffer per layer), each slab token-major ``[T][num_heads][head_dim]``.

What it must never do: change a value's bits (data is moved as same-width integers, so
NaN payloads and fp8 codes survive), or touch pool rows and heads outside the ones asked
for. Out-of-range token indices raise IndexError (``check_rows``; torch alone would wrap
negative ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PoolBuffers", "check_args", "check_rows", "gather_reference", "int_view_dtype", "scatter_reference",
           "staging_block_bytes"]

_INT_BY_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the same width, so copies are bit-exact whatever the float format."""
    width = torch.empty((), dtype=dtype).element_size()
    if width not in _INT_BY_WIDTH:
        raise ValueError(f"unsupported element width {width} for {dtype}")
    return _INT_BY_WIDTH[width]


def staging_block_bytes(num_buffers: int, num_tokens: int, num_heads: int, head_dim: int,
                        itemsize: int) -> int:
    """Bytes of one writer's block: ``num_buffers`` slabs of ``[num_tokens][num_heads][head_dim]``."""
    for name, value in (("num_buffers", num_buffers), ("num_tokens", num_tokens),
                        ("num_heads", num_heads), ("head_dim", head_dim), ("itemsize", itemsize)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return num_buffers * num_tokens * num_heads * head_dim * itemsize


class PoolBuffers:
    """One pool's buffers, validated once; pass it instead of a list on hot paths.

    Checking 160 buffers costs ~0.2 ms of Python per call, as much as the copy itself for a
    small chunk: a pool registered once is wrapped once. Every buffer is ``[pool_tokens,
    local_heads, head_dim]`` with the same shape, dtype, strides and device, heads and
    head_dim dense (the token stride may be padded).
    """

    __slots__ = ("align", "buffers", "device", "dtype", "head_dim", "itemsize", "local_heads", "pool_tokens",
                 "ptrs", "row_stride", "table")

    def __init__(self, buffers: Sequence[torch.Tensor]) -> None:
        if isinstance(buffers, torch.Tensor) or len(buffers) == 0:
            raise ValueError("pool buffers must be a non-empty sequence of tensors")
        first = buffers[0]
        if first.dim() != 3:
            raise ValueError(f"pool buffers must be [tokens, heads, head_dim], got shape {tuple(first.shape)}")
        for i, buf in enumerate(buffers):
            if (buf.shape != first.shape or buf.dtype != first.dtype or buf.stride() != first.stride()
                    or buf.device != first.device):
                raise ValueError(f"pool buffer {i} differs from buffer 0 in shape, dtype, stride or device "
                                 f"({tuple(buf.shape)} {buf.dtype} {buf.stride()} {buf.device} vs "
                                 f"{tuple(first.shape)} {first.dtype} {first.stride()} {first.device})")
        pool_tokens, local_heads, head_dim = first.shape
        if first.stride(2) != 1 or first.stride(1) != head_dim or first.stride(0) < local_heads * head_dim:
            raise ValueError(f"pool buffers must have dense heads (strides [>= {local_heads * head_dim}, "
                             f"{head_dim}, 1]), got {first.stride()}")
        self.buffers: tuple[torch.Tensor, ...] = tuple(buffers)
        self.pool_tokens: int = pool_tokens
        self.local_heads: int = local_heads
        self.head_dim: int = head_dim
        self.dtype: torch.dtype = first.dtype
        self.itemsize: int = first.element_size()
        self.device: torch.device = first.device
        self.row_stride: int = first.stride(0)  # elements between consecutive token rows
        self.ptrs: tuple[int, ...] = tuple(b.data_ptr() for b in buffers)
        # Largest power of two <= 16 dividing every buffer address and the row stride in bytes:
        # how wide the kernels' loads and stores may be.
        align = 16
        for value in (*self.ptrs, self.row_stride * self.itemsize):
            while value % align:
                align //= 2
        self.align: int = align
        self.table: torch.Tensor | None = None  # device copy of ptrs, set by the Triton launcher

    @classmethod
    def of(cls, buffers: Sequence[torch.Tensor] | PoolBuffers) -> PoolBuffers:
        """``buffers`` itself if already wrapped, else a validated wrapper."""
        return buffers if isinstance(buffers, PoolBuffers) else cls(buffers)

    def __len__(self) -> int:
        return len(self.buffers)

    def __repr__(self) -> str:
        return (f"PoolBuffers({len(self.buffers)} x [{self.pool_tokens}, {self.local_heads}, {self.head_dim}] "
                f"{self.dtype} on {self.device})")


def check_args(pool: PoolBuffers, token_idx: torch.Tensor, head_start: int, num_heads: int,
               staging: torch.Tensor, num_writers: int = 1) -> int:
    """Validate one call against a validated pool; returns one writer's block bytes.

    The staging tensor must be 1-D uint8 of exactly ``num_writers`` blocks.
    """
    if not (isinstance(head_start, int) and isinstance(num_heads, int)):
        raise ValueError("head_start and num_heads must be integers")
    if num_heads < 1 or head_start < 0 or head_start + num_heads > pool.local_heads:
        raise ValueError(f"heads [{head_start}, {head_start + num_heads}) outside the buffer's "
                         f"{pool.local_heads} local heads")
    if token_idx.dim() != 1 or token_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_idx must be a 1-D int32/int64 tensor, got {token_idx.dtype} "
                         f"shape {tuple(token_idx.shape)}")
    if token_idx.device != pool.device:
        raise ValueError(f"token_idx is on {token_idx.device}, buffers on {pool.device}")
    block = staging_block_bytes(len(pool), token_idx.numel(), num_heads, pool.head_dim, pool.itemsize)
    if staging.dtype != torch.uint8 or staging.dim() != 1 or staging.numel() != block * num_writers:
        raise ValueError(f"staging must be a 1-D uint8 tensor of {block * num_writers} bytes "
                         f"({num_writers} writer block(s) of {block}), got {staging.dtype} "
                         f"shape {tuple(staging.shape)}")
    if staging.device != pool.device:
        raise ValueError(f"staging is on {staging.device}, buffers on {pool.device}")
    return block


def check_rows(token_idx: torch.Tensor, pool_tokens: int) -> None:
    """IndexError unless every index is a row of the pool (torch would wrap negatives silently).

    Reads the indices, so on a GPU it synchronises: the daemon checks host-side copies instead.
    """
    if token_idx.numel() == 0:
        return
    low, high = int(token_idx.min()), int(token_idx.max())
    if low < 0 or high >= pool_tokens:
        raise IndexError(f"token indices span [{low}, {high}], outside the pool's {pool_tokens} rows")


def _row_selector(token_idx: torch.Tensor) -> slice | torch.Tensor:
    """A plain slice when the rows are one ascending run (a fresh allocation's pages: a strided
    copy, several times faster than indexing on a CPU), else the index tensor."""
    n = token_idx.numel()
    if n < 2:
        return token_idx.long()
    first = int(token_idx[0])
    if int(token_idx[-1]) - first == n - 1 and bool((token_idx.diff() == 1).all()):
        return slice(first, first + n)
    return token_idx.long()


class _AlignedCopy:
    """Stand-in for a misaligned slab: writes land in an aligned copy, then back in the bytes."""

    def __init__(self, part: torch.Tensor, int_dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
        self.part = part
        self.tmp = torch.empty(shape, dtype=int_dtype)

    def copy_(self, rows: torch.Tensor) -> None:
        self.tmp.copy_(rows)
        self.part.copy_(self.tmp.view(torch.uint8).reshape(-1))


def _slab_part(staging: torch.Tensor, index: int, per_buffer: int, int_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Buffer ``index``'s bytes of a block, and whether they start aligned for ``int_dtype``."""
    part = staging[index * per_buffer:(index + 1) * per_buffer]
    width = torch.empty((), dtype=int_dtype).element_size()
    return part, not (part.storage_offset() % width or part.data_ptr() % width)


def _slab(staging: torch.Tensor, index: int, per_buffer: int, shape: tuple[int, int, int],
          int_dtype: torch.dtype) -> torch.Tensor:
    """Buffer ``index``'s slab of a block as ``shape`` (read side)."""
    part, aligned = _slab_part(staging, index, per_buffer, int_dtype)
    if not aligned:
        part = part.clone()  # view(int_dtype) needs an aligned start; only reached by odd slices
    return part.view(int_dtype).view(shape)


def _slab_target(staging: torch.Tensor, index: int, per_buffer: int, shape: tuple[int, int, int],
                 int_dtype: torch.dtype) -> torch.Tensor | _AlignedCopy:
    """Buffer ``index``'s slab of a block as something to ``copy_`` rows into (write side)."""
    part, aligned = _slab_part(staging, index, per_buffer, int_dtype)
    if not aligned:
        return _AlignedCopy(part, int_dtype, shape)
    return part.view(int_dtype).view(shape)


def gather_reference(buffers: Sequence[torch.Tensor] | PoolBuffers, token_idx: torch.Tensor,
                     head_start: int, num_heads: int, out: torch.Tensor) -> None:
    """Copy heads ``[head_start, head_start+num_heads)`` of rows ``token_idx`` of every buffer into ``out``."""
    pool = PoolBuffers.of(buffers)
    check_args(pool, token_idx, head_start, num_heads, out)
    check_rows(token_idx, pool.pool_tokens)
    int_dtype = int_view_dtype(pool.dtype)
    per_buffer = out.numel() // len(pool)
    rows_of = _row_selector(token_idx)
    shape = (token_idx.numel(), num_heads, pool.head_dim)
    for b, buf in enumerate(pool.buffers):
        rows = buf.view(int_dtype)[rows_of, head_start:head_start + num_heads, :]
        _slab_target(out, b, per_buffer, shape, int_dtype).copy_(rows)


def scatter_reference(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers,
                      token_idx: torch.Tensor, head_start: int, num_heads: int) -> None:
    """Write one writer's block back into heads ``[head_start, head_start+num_heads)`` of rows ``token_idx``.

    Duplicate token indices leave one of the candidate rows (unspecified which).
    """
    pool = PoolBuffers.of(buffers)
    check_args(pool, token_idx, head_start, num_heads, staging)
    check_rows(token_idx, pool.pool_tokens)
    int_dtype = int_view_dtype(pool.dtype)
    shape = (token_idx.numel(), num_heads, pool.head_dim)
    per_buffer = staging.numel() // len(pool)
    rows_of = _row_selector(token_idx)
    for b, buf in enumerate(pool.buffers):
        buf.view(int_dtype)[rows_of, head_start:head_start + num_heads, :] = _slab(
            staging, b, per_buffer, shape, int_dtype)
