"""Triton gather/scatter kernels between KV pools and staging buffers (import name: kvd_kernels).

``gather`` packs one sender's head slice of every pool buffer (all layers, K and V) for a
chunk of tokens into a contiguous staging block; ``scatter`` writes such a block back into
a receiver's pool at its head offset. Block layout: ``[buffer_0]...[buffer_{B-1}]`` in pool
order, each slab token-major ``[T][num_heads][head_dim]``; ``staging_block_bytes`` gives its
size. Wrap a pool's buffers once in ``PoolBuffers`` (validated once, device address table
kept) and pass that on hot paths; a plain list works too. CUDA tensors go to the fused Triton kernel (one launch), CPU tensors to the torch
reference unless ``use_triton=True`` (then the Triton interpreter: TRITON_INTERPRET=1 must be
set before this package is imported). Never changes a bit of the data, never touches rows
or heads outside the ones asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import PoolBuffers, check_rows, gather_reference, scatter_reference, staging_block_bytes
from .upload import upload_indices

__all__ = ["PoolBuffers", "check_rows", "gather", "gather_reference", "scatter", "scatter_reference", "scatter_writers",
           "staging_block_bytes", "upload_indices"]


def _want_triton(tensor: torch.Tensor, use_triton: bool | None) -> bool:
    return tensor.is_cuda if use_triton is None else use_triton


def gather(buffers: Sequence[torch.Tensor] | PoolBuffers, token_idx: torch.Tensor, head_start: int,
           num_heads: int, out: torch.Tensor, *, use_triton: bool | None = None) -> None:
    """Pack heads ``[head_start, head_start+num_heads)`` of rows ``token_idx`` of all ``buffers``
    (each ``[pool_tokens, local_heads, head_dim]``) into ``out`` (1-D uint8, one block).

    On CUDA this is asynchronous on the current stream: synchronise before sending ``out``.
    """
    if _want_triton(out, use_triton):
        from .triton_kernels import gather_triton

        gather_triton(buffers, token_idx, head_start, num_heads, out)
    else:
        gather_reference(buffers, token_idx, head_start, num_heads, out)


def scatter(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers, token_idx: torch.Tensor,
            head_start: int, num_heads: int, *, use_triton: bool | None = None) -> None:
    """Unpack one writer's block ``staging`` into heads ``[head_start, head_start+num_heads)``
    of rows ``token_idx``; every other row and head of the pool is left as it was."""
    if _want_triton(staging, use_triton):
        from .triton_kernels import scatter_triton

        scatter_triton(staging, buffers, token_idx, head_start, num_heads)
    else:
        scatter_reference(staging, buffers, token_idx, head_start, num_heads)


def scatter_writers(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers,
                    token_idx: torch.Tensor, head_starts: Sequence[int], num_heads: int, *,
                    use_triton: bool | None = None) -> None:
    """Unpack a chunk region ``[writer_0 | writer_1 | ...]`` (one block per writer, ``num_heads``
    heads each); writer ``w`` lands at head ``head_starts[w]``. One launch on CUDA."""
    if not head_starts:
        raise ValueError("scatter_writers needs at least one writer")
    if _want_triton(staging, use_triton):
        from .triton_kernels import scatter_writers_triton

        scatter_writers_triton(staging, buffers, token_idx, head_starts, num_heads)
        return
    if staging.dim() != 1 or staging.numel() % len(head_starts):
        raise ValueError(f"staging of {staging.numel()} bytes does not split into "
                         f"{len(head_starts)} writer blocks")
    block = staging.numel() // len(head_starts)
    pool = PoolBuffers.of(buffers)
    for w, head_start in enumerate(head_starts):
        scatter_reference(staging[w * block:(w + 1) * block], pool, token_idx, head_start, num_heads)
