"""Pools the daemon knows: its engines' local pools and the decode pools peers announced.

Plain records plus the bounds checks every write plan goes through before any byte
moves; the daemon owns the dictionaries, this module owns what a pool *is*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from kvd.core.layout import PoolLayout
from kvd.core.planner import SMALL, PlanError, RegionIndex, check_ops_within, check_token_indices
from kvd.mem.memory import OpenedPool


def check_page_indices(pages: np.ndarray, num_pages: int, what: str) -> None:
    """Refuse page indices outside a pool before anything is planned."""
    if not len(pages):
        return
    if len(pages) <= SMALL:  # a tiny room: Python ints (numpy's per-call cost dominates)
        values = pages.tolist()
        if min(values) >= 0 and max(values) < num_pages:
            return
    pages = np.asarray(pages, dtype=np.int64)
    # One pass, not min and max: a negative index, seen unsigned, is larger than any pool.
    if int(pages.view(np.uint64).max()) >= num_pages:
        bad = pages[(pages < 0) | (pages >= num_pages)][:4].tolist()
        raise PlanError(f"{what}: page indices {bad} outside the pool's {num_pages} pages")


@dataclass
class LocalPool:
    """An engine rank's pool, opened and registered in this daemon."""

    pool_id: int
    key: str  # globally unique: daemon address + boot id + pool id
    layout: PoolLayout
    opened: OpenedPool
    conn_id: int
    bootstrap: str = ""
    closing: bool = False
    uid: int = -1  # of the engine that registered it (kept after its connection is gone)
    # Staged path only: the buffers as kernel tensors (kvd_kernels.PoolBuffers) and their device.
    tensors: Any = None
    device: str = ""

    @property
    def buffers(self) -> list[int]:
        return self.opened.buffers

    def regions(self) -> list[tuple[int, int]]:
        return [(b, self.layout.buffer_bytes) for b in self.opened.buffers]

    @cached_property
    def region_index(self) -> RegionIndex:
        """:meth:`regions`, prepared once for the per-batch bounds checks."""
        return RegionIndex(self.regions())

    def check_pages(self, pages: np.ndarray, what: str) -> None:
        check_page_indices(pages, self.layout.num_pages, what)


@dataclass
class RemotePool:
    """A decode pool a peer daemon announced to us (we write into it)."""

    key: str
    layout: PoolLayout
    buffers: list[int]
    session_id: str
    daemon: str
    staging_base: int = 0  # the receiver's staging pool (staged path); 0 bytes: none
    staging_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def regions(self) -> list[tuple[int, int]]:
        return [(b, self.layout.buffer_bytes) for b in self.buffers]

    @cached_property
    def region_index(self) -> RegionIndex:
        """:meth:`regions`, prepared once (an announce that changes the buffers makes a new record)."""
        return RegionIndex(self.regions())

    def check_tokens(self, tokens: np.ndarray, what: str) -> None:
        check_token_indices(tokens, self.layout, what)

    def check_ops(self, ops: Any) -> None:
        check_ops_within(ops, self.regions(), f"write into {self.key}")


__all__ = ["LocalPool", "RemotePool"]
