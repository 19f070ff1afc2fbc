"""The status snapshot ``kvctl status`` and ``--json`` read: one plain dict built from the parts.

Read-only: it walks the parts' state and never changes it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kvd import __version__
from kvd.core.config import Config
from kvd.core.rooms import RoomState
from kvd.obs.metrics import Metrics
from kvd.shell.peer_hub import PeerHub
from kvd.shell.pool_registry import PoolRegistry
from kvd.sides.receiver import ReceiverSide
from kvd.sides.sender import SenderSide
from kvd.sides.tasks import TaskOwner
from kvd.transfer.base import Transport


@dataclass
class StatusSources:
    """Everything a status snapshot reads."""

    config: Config
    started: float
    registry: PoolRegistry
    senders: SenderSide
    receivers: ReceiverSide
    peers: PeerHub
    metrics: Metrics
    errors: Counter[str]
    transport: Transport | None
    tasks: TaskOwner


def snapshot(s: StatusSources) -> dict[str, Any]:
    rooms = s.senders.snapshot() + s.receivers.snapshot()
    counts = s.metrics.snapshot()
    t = s.transport
    return {
        "daemon": {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - s.started, 1),
            "hostname": s.config.hostname, "peer_address": s.peers.address,
            "transport": {"protocol": t.protocol if t else "-", "devices": t.devices if t else "-",
                          "session_id": t.session_id if t else "-",
                          "same_node": getattr(getattr(t, "main", t), "same_node", "off") if t else "-"},
            # Per peer session written to: path (local / cuda_ipc / network), why, and fallbacks.
            "peer_paths": getattr(getattr(t, "main", t), "paths", dict)() if t else {},
            "staging": staging_snapshot(s),
            "errors": dict(s.errors),
            "rooms_by_path": {path.value: n for path, n in s.receivers.paths.items()},
            "bytes_total": int(counts.get("bytes_sent", 0)),
            "bytes_received_total": int(counts.get("bytes_received", 0)),
            "write_ops_total": int(counts.get("write_ops", 0)),
            "batches_total": int(counts.get("batches", 0)),
            "inline_writes_total": int(counts.get("inline_writes", 0)),
            "tasks": len(s.tasks),
            "pools": [{"pool_id": x.pool_id, "key": x.key, "layout": x.layout.describe()}
                      for x in s.registry.local.values()],
        },
        "rooms": rooms,
        "peers": s.peers.snapshot(rooms),
    }


def staging_snapshot(s: StatusSources) -> dict[str, Any]:
    pools = s.registry.staging_figures()
    return {"enabled": s.config.staging_enabled,
            "pool_bytes": sum(x["pool_bytes"] for x in pools),
            "reserved_bytes": sum(x["reserved_bytes"] for x in pools),
            "in_use_bytes": sum(x["in_use_bytes"] for x in pools),
            "waiting_rooms": sum(x["waiting"] for x in pools),
            "whole": all(x["whole"] for x in pools),
            "staged_rooms": sum(1 for rr in s.receivers.rooms.values() if rr.staged)
            + sum(1 for sr in s.senders.rooms.values() if sr.staged()),
            "kernel_seconds": s.registry.kernel_seconds(),
            # How this daemon's staged chunks left: gathered into the send ring, or written
            # straight from whole-row pool runs (no gather).
            "chunks_sent": dict(s.senders.staged_path.chunks_sent),
            "pools": pools}


def room_counts(senders: SenderSide, receivers: ReceiverSide) -> Counter[tuple[str, str]]:
    """Rooms by (role, state), every pair present (gauges must go back to 0)."""
    counts: Counter[tuple[str, str]] = Counter()
    for sr in senders.rooms.values():
        counts[(senders.role, sr.machine.state.value)] += 1
    for rr in receivers.rooms.values():
        counts[(receivers.role, rr.machine.state.value)] += 1
    for role in (senders.role, receivers.role):
        for state in RoomState:
            counts.setdefault((role, state.value), 0)
    return counts


__all__ = ["StatusSources", "snapshot", "staging_snapshot", "room_counts"]
