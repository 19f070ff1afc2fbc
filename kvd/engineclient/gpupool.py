"""Engine side of a GPU pool: CUDA tensors handed to kvd as CUDA IPC handles.

``cuda_ipc_memory(tensors)`` is the ``memory`` map of ``RegisterPool`` for a pool whose
buffers live on a GPU: one handle per buffer (torch's own CUDA IPC reduction, spelled out
field by field so it travels as msgpack, never as a pickle). The engine keeps the tensors
alive for as long as the pool is registered; kvd opens them with ``kvd.memory``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from kvd.core.layout import PoolLayout

_CLASSES = ("tensor_cls", "storage_cls")


def cuda_ipc_handle(tensor: torch.Tensor) -> dict[str, Any]:
    """One CUDA tensor as a msgpack-friendly map of torch's rebuild arguments."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not tensor.is_cuda:
        raise ValueError(f"a CUDA IPC handle needs a CUDA tensor, got one on {tensor.device}")
    rebuild, args = reduce_tensor(tensor)
    names = list(inspect.signature(rebuild).parameters)
    handle = dict(zip(names, args, strict=True))
    for name in _CLASSES:
        handle[name] = handle[name].__name__
    handle["dtype"] = str(handle["dtype"]).removeprefix("torch.")
    handle["tensor_size"] = list(handle["tensor_size"])
    handle["tensor_stride"] = list(handle["tensor_stride"])
    return handle


def cuda_ipc_memory(tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The ``memory`` map of a GPU pool: ``{"kind": "cuda_ipc", "handles": [...]}``."""
    return {"kind": "cuda_ipc", "handles": [cuda_ipc_handle(t) for t in tensors]}


def allocate_gpu_pool(layout: PoolLayout, device: str | torch.device = "cuda") -> list[torch.Tensor]:
    """A pool's buffers as separate ``[num_tokens, local_heads, head_dim]`` CUDA tensors."""
    dtype = getattr(torch, layout.dtype)
    shape = (layout.num_tokens, layout.local_heads, layout.head_dim)
    return [torch.empty(shape, dtype=dtype, device=device) for _ in range(layout.num_buffers)]


__all__ = ["allocate_gpu_pool", "cuda_ipc_handle", "cuda_ipc_memory"]
