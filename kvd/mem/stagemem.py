"""Staging memory and the kernels that fill and drain it (the I/O half of the staged path).

One ``StagingPool`` per device (``cpu`` for host pools, ``cuda:N`` for GPU pools): a single
buffer registered with the transport once, split into a *receive* ring (regions peers
write into; its range is what a decode daemon announces) and a *send* ring (where this
daemon gathers before a bulk write). Two rings, so a daemon that both sends and receives
can never deadlock with its own reservations.

``KernelRunner`` runs ``kvd_kernels`` gather/scatter off the event loop: on CPU the torch
reference in a worker thread, on CUDA the Triton kernels on dedicated streams (one for
gathers, one for scatters), each call returning only once its stream has finished, so
"written" and "done" always mean the bytes are in place.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kvd_kernels
import numpy as np
import torch

from kvd.core.layout import PoolLayout
from kvd.core.ring import AsyncRing, RingAllocator
from kvd.mem.memory import OpenedPool, prefault

ALIGN = 256


class StagingPool:
    """A registered staging buffer: receive ring at ``[0, recv_bytes)``, send ring after it."""

    def __init__(self, device: str, nbytes: int, send_share: float = 0.25) -> None:
        if nbytes < 4 * ALIGN:
            raise ValueError(f"staging pool of {nbytes} bytes is too small")
        self.device = device
        self._mapping: mmap.mmap | None = None
        if device == "cpu":
            # Host staging: every page mapped by a background thread (see memory.prefault), so
            # writes into it do not fault one page at a time, and creating it does not block.
            self._mapping = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            self.tensor = torch.frombuffer(self._mapping, dtype=torch.uint8)
            prefault(self.tensor.data_ptr(), nbytes)
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.base = self.tensor.data_ptr()
        self.nbytes = nbytes
        send = max(ALIGN, int(nbytes * send_share) // ALIGN * ALIGN)
        self.recv_bytes = (nbytes - send) // ALIGN * ALIGN
        self.send_offset = self.recv_bytes
        self.recv = AsyncRing(RingAllocator(self.recv_bytes, ALIGN))
        self.send_capacity = nbytes - self.send_offset
        self.send = AsyncRing(RingAllocator(self.send_capacity, ALIGN))
        self.data_bytes = 0  # bytes of receive regions that peers have written into

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes ``[offset, offset + nbytes)`` of the whole buffer (receive ring offsets as is)."""
        return self.tensor[offset:offset + nbytes]

    def send_view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.view(self.send_offset + offset, nbytes)

    def send_address(self, offset: int) -> int:
        return self.base + self.send_offset + offset

    @property
    def whole(self) -> bool:
        return self.recv.allocator.is_whole() and self.send.allocator.is_whole()

    def stats(self) -> dict[str, Any]:
        recv, send = self.recv.allocator, self.send.allocator
        return {"device": self.device, "pool_bytes": self.nbytes, "receive_bytes": self.recv_bytes,
                "reserved_bytes": recv.used, "in_use_bytes": self.data_bytes + send.used,
                "send_bytes_in_use": send.used, "waiting": self.recv.waiting + self.send.waiting,
                "whole": self.whole}

    def close(self) -> None:
        self.recv.fail_waiters("the daemon is stopping")
        self.send.fail_waiters("the daemon is stopping")


def torch_dtype(layout: PoolLayout) -> torch.dtype:
    return getattr(torch, layout.dtype)


def pool_tensors(layout: PoolLayout, opened: OpenedPool) -> kvd_kernels.PoolBuffers:
    """The pool's buffers as ``[tokens, local_heads, head_dim]`` tensors over the engine's memory."""
    dtype = torch_dtype(layout)
    shape = (layout.num_tokens, layout.local_heads, layout.head_dim)
    keep = opened.backing
    tensors = []
    if keep and isinstance(keep[0], torch.Tensor):  # CUDA IPC: one tensor per buffer
        for t in keep:
            flat = t.reshape(-1).view(torch.uint8)[:layout.buffer_bytes]
            tensors.append(flat.view(dtype).view(shape))
    else:  # host: one shared-memory mapping holding every buffer
        mapping = keep[0]
        base = opened.regions[0][0]
        for addr in opened.buffers:
            flat = torch.frombuffer(mapping, dtype=torch.uint8, count=layout.buffer_bytes, offset=addr - base)
            tensors.append(flat.view(dtype).view(shape))
    return kvd_kernels.PoolBuffers(tensors)


def device_of(opened: OpenedPool) -> str:
    keep = opened.backing
    if keep and isinstance(keep[0], torch.Tensor) and keep[0].is_cuda:
        return f"cuda:{keep[0].device.index}"
    return "cpu"


class KernelRunner:
    """Gather and scatter off the loop; each awaitable finishes when the bytes are in place."""

    def __init__(self, threads: int = 2) -> None:
        # CPU copies run one per worker thread: torch's own intra-op threads on top of those
        # only oversubscribe the cores Mooncake and the event loop need.
        torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvd-kernel")
        self._streams: dict[tuple[str, str], Any] = {}
        self.busy_s = {"gather": 0.0, "scatter": 0.0}  # kernel time, for overlap figures

    def _stream(self, device: torch.device, kind: str) -> Any:
        key = (str(device), kind)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    @staticmethod
    def _index(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
        # An async copy ordered on the current (our) stream, through a reused pinned buffer.
        return kvd_kernels.upload_indices([tokens], device)[0]

    def _run(self, kind: str, device: torch.device, fn: Any) -> None:
        t0 = time.perf_counter()
        if device.type == "cuda":
            stream = self._stream(device, kind)
            with torch.cuda.device(device), torch.cuda.stream(stream):
                fn()
            stream.synchronize()
        else:
            fn()
        self.busy_s[kind] += time.perf_counter() - t0

    async def gather(self, pool: kvd_kernels.PoolBuffers, tokens: np.ndarray, head_start: int,
                     num_heads: int, out: torch.Tensor) -> None:
        def work() -> None:  # the index upload too goes on our stream, never the legacy default one
            self._run("gather", pool.device, lambda: kvd_kernels.gather(
                pool, self._index(tokens, pool.device), head_start, num_heads, out))

        await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def scatter(self, region: torch.Tensor, pool: kvd_kernels.PoolBuffers, tokens: np.ndarray,
                      head_starts: list[int], num_heads: int) -> None:
        def work() -> None:
            self._run("scatter", pool.device, lambda: kvd_kernels.scatter_writers(
                region, pool, self._index(tokens, pool.device), head_starts, num_heads))

        await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["KernelRunner", "StagingPool", "device_of", "pool_tensors", "torch_dtype"]
