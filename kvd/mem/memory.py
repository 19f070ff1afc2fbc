"""Open an engine's KV pool memory inside the daemon.

Host pools arrive as a file descriptor the engine handed over (:mod:`kvd.mem.fdpool`) plus
the offset of each buffer; a segment *name* is refused (kvd would open it with its own
rights: the confused deputy). GPU pools arrive as CUDA IPC handles (one per buffer). Either way the daemon
ends up with the base address of every buffer in its own address space and one
or more regions to register with the transport. The engine owns the memory: the
daemon maps it, never frees it, and never unlinks a segment.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

from kvd.core.layout import PoolLayout
from kvd.mem.fdpool import open_fd_pool
from kvd.mem.opened import OpenedPool, PoolMemoryError, prefault, prefault_ranges

SHM_DIR = "/dev/shm"


def _address_of(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def open_host_pool(layout: PoolLayout, memory: dict[str, Any]) -> OpenedPool:
    """Map the shared-memory segment and check every buffer lies inside it."""
    name = memory.get("name")
    offsets = memory.get("offsets")
    if not isinstance(name, str) or not name or "/" in name.strip("/"):
        raise PoolMemoryError(f"shm pool needs a plain segment name, got {name!r}")
    if not isinstance(offsets, list) or len(offsets) != layout.num_buffers or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise PoolMemoryError(f"shm pool needs {layout.num_buffers} non-negative buffer offsets "
                           f"(layers x K/V), got {offsets!r}")
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PoolMemoryError(f"cannot open shared-memory segment {path}: {exc}") from None
    try:
        size = os.fstat(fd).st_size
        end = max(offsets) + layout.buffer_bytes
        if size < end:
            raise PoolMemoryError(f"segment {path} has {size} bytes but the layout needs {end} "
                               f"({layout.num_buffers} buffers of {layout.buffer_bytes})")
        mapping = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    ordered = sorted(offsets)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b - a < layout.buffer_bytes:
            raise PoolMemoryError(f"buffers at offsets {a} and {b} overlap")
    base = _address_of(mapping)
    prefault_ranges([(base + o, layout.buffer_bytes) for o in offsets])
    return OpenedPool(buffers=[base + o for o in offsets], regions=[(base, end)], _keep=[mapping])


def open_cuda_pool(layout: PoolLayout, memory: dict[str, Any]) -> OpenedPool:
    """Open per-buffer CUDA IPC handles (torch's reduction of a CUDA tensor)."""
    try:
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
    except ImportError as exc:  # pragma: no cover
        raise PoolMemoryError(f"GPU pools need torch with CUDA: {exc}") from None
    if not torch.cuda.is_available():
        raise PoolMemoryError("a GPU pool was offered but this daemon sees no CUDA device")
    handles = memory.get("handles")
    if not isinstance(handles, list) or len(handles) != layout.num_buffers:
        raise PoolMemoryError(f"cuda_ipc pool needs {layout.num_buffers} handles, got "
                           f"{len(handles) if isinstance(handles, list) else handles!r}")
    tensors = []
    for i, h in enumerate(handles):
        try:
            t = rebuild_cuda_tensor(**_decode_ipc_handle(h))
        except Exception as exc:  # torch raises RuntimeError and friends
            raise PoolMemoryError(f"cannot open CUDA IPC handle of buffer {i}: {exc}") from None
        if t.numel() * t.element_size() < layout.buffer_bytes:
            raise PoolMemoryError(f"buffer {i} holds {t.numel() * t.element_size()} bytes, "
                               f"layout needs {layout.buffer_bytes}")
        tensors.append(t)
    buffers = [t.data_ptr() for t in tensors]
    return OpenedPool(buffers=buffers, regions=[(b, layout.buffer_bytes) for b in buffers],
                      _keep=tensors)


_STORAGE_CLASSES = ("UntypedStorage", "TypedStorage")


def _decode_ipc_handle(h: dict[str, Any]) -> dict[str, Any]:
    """kvd.gpupool's handle map back into torch's rebuild arguments; only plain tensors and
    known storage classes, so an engine cannot make the daemon build arbitrary objects."""
    import torch

    if not isinstance(h, dict):
        raise PoolMemoryError("a CUDA IPC handle must be a map")
    kwargs = dict(h)
    if kwargs.get("tensor_cls", "Tensor") != "Tensor":
        raise PoolMemoryError(f"tensor class {kwargs.get('tensor_cls')!r} is not a plain Tensor")
    kwargs["tensor_cls"] = torch.Tensor
    storage = kwargs.get("storage_cls", "UntypedStorage")
    if storage not in _STORAGE_CLASSES:
        raise PoolMemoryError(f"storage class {storage!r} is not one of {_STORAGE_CLASSES}")
    kwargs["storage_cls"] = getattr(torch, storage)
    dtype = getattr(torch, str(kwargs.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise PoolMemoryError(f"unknown dtype {kwargs.get('dtype')!r}")
    kwargs["dtype"] = dtype
    kwargs["tensor_size"] = tuple(kwargs["tensor_size"])
    kwargs["tensor_stride"] = tuple(kwargs["tensor_stride"])
    return kwargs


def open_pool(layout: PoolLayout, memory: dict[str, Any]) -> OpenedPool:
    """Open an engine's pool: a handed-over descriptor (``fd``) or CUDA IPC handles. A host
    pool named by its shm segment (``shm``) is refused: the daemon never opens an engine's
    memory by name with its own rights."""
    kind = memory.get("kind")
    if kind == "fd":
        return open_fd_pool(layout, memory)
    if kind == "cuda_ipc":
        return open_cuda_pool(layout, memory)
    if kind == "shm":
        raise PoolMemoryError(
            "host pools named by a shared-memory segment are refused: kvd would open the name with "
            "its own rights. Hand the pool over as a file descriptor (kvd.client does this for a "
            "HostPool or an {'kind': 'shm', 'name': ...} map; update the client)")
    raise PoolMemoryError(f"memory kind must be 'fd' or 'cuda_ipc', got {str(kind)[:40]!r}")


__all__ = ["OpenedPool", "PoolMemoryError", "open_pool", "prefault", "open_host_pool", "open_cuda_pool"]
