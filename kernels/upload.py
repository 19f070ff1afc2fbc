"""Small host index arrays to the device without a pinned allocation per call.

``tensor.pin_memory()`` per launch asks torch's caching host allocator for a pinned block every
time; under several copy threads that call blocked for milliseconds (py-spy on the prefill daemon
of a TP 4->1 same-node room: most of a copy worker's time sat on that line, not on the copy).
Each thread here keeps one pinned buffer and reuses it once its last upload has finished.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["upload_indices"]

_MIN_ELEMENTS = 1 << 16  # 512 KiB of int64 indices: the buffer grows past it only for huge batches
_local = threading.local()


def upload_indices(arrays: Sequence[Any], device: torch.device) -> list[torch.Tensor]:
    """``arrays`` (host index arrays) as int64 tensors on ``device``, copied asynchronously on the
    current stream through this thread's pinned buffer (CPU devices: the arrays themselves)."""
    hosts = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    if device.type != "cuda":
        return [torch.from_numpy(h) for h in hosts]
    total = sum(h.size for h in hosts)
    pinned: torch.Tensor | None = getattr(_local, "pinned", None)
    done: torch.cuda.Event | None = getattr(_local, "done", None)
    if pinned is None or pinned.numel() < total:
        pinned = _local.pinned = torch.empty(max(total, _MIN_ELEMENTS), dtype=torch.int64, pin_memory=True)
        done = _local.done = None
    if done is not None:
        done.synchronize()  # the last upload from this buffer has been read by the device
    view = pinned[:total].numpy()
    offsets = []
    at = 0
    for h in hosts:
        view[at:at + h.size] = h
        offsets.append((at, h.size))
        at += h.size
    stream = torch.cuda.current_stream(device)
    on_device = pinned[:total].to(device, non_blocking=True)
    if done is None:
        done = _local.done = torch.cuda.Event()
    done.record(stream)
    return [on_device[o:o + n] for o, n in offsets]
