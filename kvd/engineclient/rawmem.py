"""Registration by raw pointer: turn an engine's ``(pointer, length)`` buffers into a pool
``memory`` map the daemon can open.

Engines such as SGLang hand a transfer backend raw addresses, not tensors or segment names.
Host memory: the daemon can only map what lives in a POSIX shared-memory segment, so every
buffer must fall inside one ``/dev/shm`` file mapped by this process; this module finds it
through ``/proc/self/maps`` and returns the segment name and per-buffer file offsets (the
``{"kind": "shm"}`` map ``kvd.memory`` opens). Anything else is refused with a message naming
the buffer and what the engine must do. GPU memory: :func:`cuda_memory_for_pointers` asks the
CUDA driver for the allocation behind each pointer and exports it by CUDA IPC.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SHM_PREFIX = "/dev/shm/"


class RawMemoryError(ValueError):
    """A raw pointer range kvd cannot register; the message says why and what to do."""


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str


def read_maps(pid: int | str = "self") -> list[Mapping]:
    """File-backed mappings of a process, from ``/proc/<pid>/maps``."""
    out: list[Mapping] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            lo, hi = parts[0].split("-")
            out.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), parts[5].rstrip("\n")))
    return out


def _find(maps: list[Mapping], ptr: int, length: int) -> Mapping | None:
    for m in maps:
        if m.start <= ptr and ptr + length <= m.end:
            return m
    return None


def shm_memory_for_pointers(ptrs: Sequence[int], lens: Sequence[int],
                            maps: list[Mapping] | None = None) -> dict[str, Any]:
    """The ``{"kind": "shm"}`` memory map of buffers given as raw host pointers.

    Every buffer must lie inside one and the same ``/dev/shm`` segment mapped shared by this
    process; the returned offsets are file offsets, so the daemon's own mapping of the segment
    addresses the same bytes.
    """
    if len(ptrs) != len(lens) or not ptrs:
        raise RawMemoryError(f"need one length per pointer, got {len(ptrs)} pointers and {len(lens)} lengths")
    maps = read_maps() if maps is None else maps
    name: str | None = None
    offsets: list[int] = []
    for i, (ptr, length) in enumerate(zip(ptrs, lens, strict=True)):
        m = _find(maps, int(ptr), int(length))
        if m is None or not m.path.startswith(SHM_PREFIX):
            where = "is not mapped by this process" if m is None else f"lies in {m.path or 'anonymous memory'}"
            raise RawMemoryError(
                f"KV buffer {i} at {int(ptr):#x} ({int(length)} bytes) {where}: kvd can register a host "
                "pool only when it lives in POSIX shared memory (/dev/shm) that the daemon can map. "
                "Allocate the pool in a shared-memory segment (e.g. torch.frombuffer over "
                "multiprocessing.shared_memory), or use a GPU pool (registered by CUDA IPC)")
        seg = m.path[len(SHM_PREFIX):].removesuffix(" (deleted)")
        if m.path.endswith(" (deleted)"):
            raise RawMemoryError(f"KV buffer {i} lies in shared-memory segment {seg!r}, which was unlinked: "
                                 "the daemon cannot open it by name; keep the segment linked while registered")
        if name is not None and seg != name:
            raise RawMemoryError(f"KV buffers lie in two shared-memory segments ({name!r} and {seg!r}); "
                                 "kvd registers one segment per pool: allocate every buffer in one segment")
        name = seg
        offsets.append(int(ptr) - m.start + m.offset)
    assert name is not None
    size = os.stat(SHM_PREFIX + name).st_size
    return {"kind": "shm", "name": name, "size": size, "offsets": offsets}


def cuda_memory_for_pointers(ptrs: Sequence[int], lens: Sequence[int]) -> dict[str, Any]:
    """The ``{"kind": "cuda_ipc"}`` memory map of buffers given as raw CUDA device pointers.

    Each pointer is resolved to its base allocation (``cuMemGetAddressRange``), exported with
    ``cudaIpcGetMemHandle`` and described as a torch CUDA IPC rebuild map at the pointer's
    offset, so the daemon opens exactly ``[ptr, ptr+len)``.
    """
    import ctypes

    import torch

    if not torch.cuda.is_available():
        raise RawMemoryError("GPU KV pointers were given but this process sees no CUDA device")
    from kvd.engineclient.gpupool import cuda_ipc_handle

    libcuda = ctypes.CDLL("libcuda.so.1")
    handles = []
    for i, (ptr, length) in enumerate(zip(ptrs, lens, strict=True)):
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(int(ptr)))
        if rc != 0:
            raise RawMemoryError(f"KV buffer {i} at {int(ptr):#x}: cuMemGetAddressRange failed ({rc}); "
                                 "is it device memory allocated with cudaMalloc (not VMM/expandable segments)?")
        if int(ptr) + int(length) > base.value + size.value:
            raise RawMemoryError(f"KV buffer {i} at {int(ptr):#x} runs past its allocation")
        # A byte tensor over the pointer; torch's reduction exports the base allocation plus
        # the offset. Not yet run on a GPU (see notes/sglang-daemon-changes.md).
        tensor = _tensor_at(int(ptr), int(length))
        handles.append(cuda_ipc_handle(tensor))
    return {"kind": "cuda_ipc", "handles": handles}


def _tensor_at(ptr: int, length: int) -> Any:  # pragma: no cover - needs a GPU
    import torch

    class _Iface:
        __cuda_array_interface__ = {"shape": (length,), "typestr": "|u1", "data": (ptr, False), "version": 3}

    return torch.as_tensor(_Iface(), device="cuda")


__all__ = ["Mapping", "RawMemoryError", "cuda_memory_for_pointers", "read_maps", "shm_memory_for_pointers"]
