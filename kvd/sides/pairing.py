"""What one sender pool owes one receiver pool: head slices, receivers per room and a write
planner per slice, worked out once per pair of pools and shared by every request between them
(issue 15: the checks and the mapping were most of a tiny room's planning)."""

from __future__ import annotations

from dataclasses import dataclass

from kvd.core.layout import check_compatible
from kvd.core.planner import DirectPlanner, HeadSlice, map_heads
from kvd.mem.pools import LocalPool, RemotePool

MAX_PAIRINGS = 4096  # pairs of pools remembered; past this the cache starts again


@dataclass(frozen=True)
class Pairing:
    """What one sender pool owes one receiver pool."""

    remote: RemotePool  # the announce it was worked out for
    slices: tuple[HeadSlice, ...]
    receivers: int  # receiver ranks each room of the sender rank writes to
    planners: tuple[DirectPlanner, ...]  # one per slice


class Pairings:
    """Pairings by (sender pool, receiver pool). A pool's layout and buffers never change and a
    remote pool key names one registration; a re-announced pool is worked out anew."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, str, str], Pairing] = {}

    def of(self, pool: LocalPool, remote: RemotePool) -> Pairing:
        """Checked (layouts compatible, slices valid) the first time; raises LayoutError/PlanError."""
        key = (pool.pool_id, pool.key, remote.key)
        found = self._known.get(key)
        if found is None or found.remote is not remote:
            local = pool.layout
            check_compatible(local, remote.layout)
            mapping = map_heads(local.total_kv_heads, local.tp_size, remote.layout.tp_size)
            slices = tuple(mapping.slices_between(local.tp_rank, remote.layout.tp_rank))
            planners = tuple(DirectPlanner(local, pool.buffers, remote.layout, remote.buffers, s) for s in slices)
            found = Pairing(remote, slices, len(mapping.receivers_of(local.tp_rank)), planners)
            if len(self._known) >= MAX_PAIRINGS:
                self._known.clear()
            self._known[key] = found
        return found


__all__ = ["MAX_PAIRINGS", "Pairing", "Pairings"]
