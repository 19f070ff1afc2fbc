"""Decode side of a room: find the prefill senders, ask them, count their reports, release.

A receiver room is one (decode pool, room). It resolves the prefill engine's
topology through the engine's directory daemon, announces the decode pool to every
sender daemon once, sends one request per sender rank the TP mapping names, and
counts final reports per sender *engine rank*. A room that fails asks its senders
to stop and is released to the engine only when each sender that could still
write has acknowledged (or its daemon is dead and the fence time has passed).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog

from . import protocol as p
from .layout import LayoutError, PoolLayout, check_compatible
from .planner import PlanError, map_heads
from .pools import LocalPool
from .rooms import CompletionTracker, Deadlines, RoomError, RoomInput, RoomMachine, RoomState

if TYPE_CHECKING:
    from .daemon import Daemon

log = structlog.get_logger("kvd.receiver")


@dataclass
class SenderLink:
    rank: int
    daemon: str
    dummy: bool
    final: bool = False      # sent a final status: it will write nothing more
    acked: bool = False      # answered our abort
    bytes_written: int = 0


@dataclass
class ReceiverRoom:
    pool: LocalPool
    room: int
    transfer_id: int
    machine: RoomMachine
    dst_indices: np.ndarray
    bootstrap_addr: str
    prefill_engine_id: str
    hisparse: bool
    senders: dict[int, SenderLink] = field(default_factory=dict)
    tracker: CompletionTracker | None = None
    aux: bytes = b""
    bytes_total: int = 0
    released: bool = False
    abort_sent: bool = False
    dead_since: float | None = None
    task: asyncio.Task | None = None

    @property
    def bytes_done(self) -> int:
        return sum(s.bytes_written for s in self.senders.values())

    def peers(self) -> set[str]:
        return {s.daemon for s in self.senders.values()}


class ReceiverSide:
    """Every receiver room of this daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.rooms: dict[tuple[int, int], ReceiverRoom] = {}
        self._by_transfer: dict[int, ReceiverRoom] = {}

    def start(self, pool: LocalPool, msg: p.RecvRoom) -> None:
        key = (pool.pool_id, msg.room)
        if key in self.rooms:
            raise RoomError(f"room {msg.room} is still in flight on this pool (state "
                            f"{self.rooms[key].machine.state.value}); wait for its release")
        c = self.d.config
        waiting = msg.timeout_s if msg.timeout_s > 0 else c.waiting_timeout_s
        deadlines = Deadlines(min(c.bootstrap_timeout_s, waiting), waiting, c.transfer_timeout_s)
        rr = ReceiverRoom(pool, msg.room, secrets.randbits(63), RoomMachine(deadlines, self.d.now()),
                          msg.pages, msg.bootstrap_addr, msg.prefill_engine_id, msg.enable_hisparse)
        layout = pool.layout
        per_index = layout.token_bytes if msg.enable_hisparse else layout.page_bytes
        rr.bytes_total = len(msg.pages) * per_index * layout.num_buffers
        self.rooms[key] = rr
        self._by_transfer[rr.transfer_id] = rr
        self.d.room_changed("decode", None, rr.machine.state, room=rr.room, pool=pool.key)
        rr.task = asyncio.get_running_loop().create_task(self._bootstrap(rr))

    async def _bootstrap(self, rr: ReceiverRoom) -> None:
        try:
            info = await self.d.engine_info(rr.bootstrap_addr, rr.prefill_engine_id, rr.machine)
            layouts = [PoolLayout.from_dict(x) for x in info.layouts]
            local = rr.pool.layout
            check_compatible(layouts[0], local)
            if rr.hisparse != local.hisparse:
                raise PlanError("enable_hisparse needs a HiSparse host pool (page size 1) on the decode "
                                "side" if rr.hisparse else "a HiSparse pool receives with enable_hisparse")
            mapping = map_heads(local.total_kv_heads, info.tp_size, local.tp_size)
            required = mapping.required_senders(local.tp_rank)
            for s in mapping.notified_senders(local.tp_rank):
                rr.senders[s] = SenderLink(s, info.daemons[s], dummy=s not in required)
            rr.tracker = CompletionTracker(required)
            for daemon in sorted(rr.peers()):
                await self.d.announce_pool(daemon, rr.pool, rr.prefill_engine_id, rr.machine)
        except (LayoutError, PlanError) as exc:
            self.d.count_error("layout")
            self.fail(rr, str(exc))
            return
        except (TimeoutError, ConnectionError) as exc:
            self.fail(rr, str(exc) or "prefill bootstrap timed out")
            return
        if rr.machine.state.final:
            return
        for link in rr.senders.values():
            self.d.send_peer(link.daemon, p.TransferRequest(
                src=self.d.address, token=self.d.token, room=rr.room, transfer_id=rr.transfer_id,
                pool_key=rr.pool.key, prefill_engine_id=rr.prefill_engine_id, sender_rank=link.rank,
                dst_indices=np.empty(0, np.int64) if link.dummy else rr.dst_indices,
                dummy=link.dummy, deadline_s=rr.machine.deadlines.waiting_for_input,
                enable_hisparse=rr.hisparse))
        self._apply(rr, RoomInput.BOOTSTRAPPED)

    # --- peer messages ------------------------------------------------------------------
    def _lookup(self, transfer_id: int, pool_key: str, room: int) -> ReceiverRoom | None:
        rr = self._by_transfer.get(transfer_id)
        if rr is None or rr.pool.key != pool_key or rr.room != room:
            self.d.count_error("stale_message")  # a late message for an ended room: never touches a new one
            return None
        return rr

    def on_status(self, msg: p.TransferStatus) -> None:
        rr = self._lookup(msg.transfer_id, msg.pool_key, msg.room)
        if rr is None:
            return
        link = rr.senders.get(msg.sender_rank)
        if link is None or link.daemon != msg.src:
            self.d.count_error("bad_peer_message")
            self.fail(rr, f"status from unexpected sender rank {msg.sender_rank} at {msg.src}")
            return
        if link.final:
            self.d.count_error("bad_peer_message")
            self.fail(rr, f"sender rank {msg.sender_rank} reported twice")
            return
        link.bytes_written = max(link.bytes_written, msg.bytes_written)
        if not msg.final:
            if rr.machine.state in (RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING):
                self._apply(rr, RoomInput.PROGRESS)
            return
        link.final = True
        if not msg.ok:
            self.fail(rr, f"sender rank {msg.sender_rank} failed: {msg.reason}")
            return
        if link.dummy:
            self._maybe_release(rr)
            return
        assert rr.tracker is not None
        try:
            rr.tracker.report(msg.sender_rank, True)
        except RoomError as exc:
            self.d.count_error("bad_peer_message")
            self.fail(rr, str(exc))
            return
        if msg.aux and not rr.aux:
            rr.aux = msg.aux
        if rr.tracker.done and not rr.machine.state.final:
            self._apply(rr, RoomInput.COMPLETED)
            self.d.observe_room(self.d.now() - rr.machine.created_at)
            self._maybe_release(rr)

    def on_abort_ack(self, msg: p.AbortAck) -> None:
        rr = self._by_transfer.get(msg.transfer_id)
        if rr is None:
            return
        link = rr.senders.get(msg.sender_rank)
        if link is not None and link.daemon == msg.src:
            link.acked = True
            self._maybe_release(rr)

    # --- failure, abort, release --------------------------------------------------------
    def abort_from_engine(self, pool: LocalPool, room: int) -> None:
        rr = self.rooms.get((pool.pool_id, room))
        if rr is None:
            raise RoomError(f"no room {room} in flight on pool {pool.pool_id}")
        self.fail(rr, "aborted by the decode engine")

    def fail(self, rr: ReceiverRoom, reason: str) -> None:
        before = rr.machine.state
        if rr.machine.fail(self.d.now(), reason):
            self.d.room_changed("decode", before, rr.machine.state, room=rr.room, pool=rr.pool.key,
                                reason=reason)
            self._tell(rr)
            self._send_aborts(rr, reason)
        self._maybe_release(rr)

    def _send_aborts(self, rr: ReceiverRoom, reason: str) -> None:
        rr.abort_sent = True
        for link in rr.senders.values():
            if not link.final and not link.dummy:
                self.d.send_peer(link.daemon, p.AbortTransfer(
                    src=self.d.address, token=self.d.token, room=rr.room, transfer_id=rr.transfer_id,
                    pool_key=rr.pool.key, sender_rank=link.rank, reason=reason))

    def _may_still_write(self, rr: ReceiverRoom, now: float) -> list[int]:
        """Sender ranks whose writes into this room's pages could still land."""
        if rr.machine.state is RoomState.SUCCESS:
            return []
        fence_over = rr.dead_since is not None and now - rr.dead_since >= self.d.config.abort_fence_s
        return [s.rank for s in rr.senders.values()
                if not (s.dummy or s.final or s.acked or fence_over)]

    def _maybe_release(self, rr: ReceiverRoom) -> None:
        if rr.released or not rr.machine.state.final:
            return
        if self._may_still_write(rr, self.d.now()):
            return
        rr.released = True
        if self.rooms.get((rr.pool.pool_id, rr.room)) is rr:
            del self.rooms[(rr.pool.pool_id, rr.room)]
        self._by_transfer.pop(rr.transfer_id, None)
        if rr.task is not None and not rr.task.done():
            rr.task.cancel()
        self._tell(rr)

    def _tell(self, rr: ReceiverRoom) -> None:
        self.d.tell_engine(rr.pool, p.RoomEvent(
            req_id=0, room=rr.room, state=rr.machine.state.value, reason=rr.machine.reason,
            aux=rr.aux if rr.machine.state is RoomState.SUCCESS else b"", bytes_done=rr.bytes_done,
            bytes_total=rr.bytes_total, released=rr.released))

    def _apply(self, rr: ReceiverRoom, event: RoomInput) -> None:
        before = rr.machine.state
        try:
            after = rr.machine.apply(event, self.d.now())
        except RoomError as exc:
            self.d.count_error("state")
            self.fail(rr, str(exc))
            return
        if after is not before:
            self.d.room_changed("decode", before, after, room=rr.room, pool=rr.pool.key)
            if after is RoomState.FAILED:
                self._tell(rr)  # success is told once, by the release that follows at once

    # --- housekeeping -------------------------------------------------------------------
    def expire(self, now: float) -> None:
        for rr in list(self.rooms.values()):
            if rr.machine.expired(now):
                self.d.count_error("timeout")
                self.fail(rr, rr.machine.timeout_reason())
            elif rr.machine.state.final:
                self._maybe_release(rr)

    def peer_dead(self, peer: str) -> None:
        now = self.d.now()
        for rr in list(self.rooms.values()):
            if peer in rr.peers() or (not rr.senders and peer == rr.bootstrap_addr):
                rr.dead_since = rr.dead_since or now
                self.fail(rr, f"prefill daemon {peer} stopped answering heartbeats")

    def pool_closed(self, pool: LocalPool) -> None:
        for rr in list(self.rooms.values()):
            if rr.pool is pool:
                self.fail(rr, "the decode engine disconnected")

    def busy_pools(self) -> set[int]:
        return {rr.pool.pool_id for rr in self.rooms.values()}

    def active_peers(self) -> set[str]:
        out: set[str] = set()
        for rr in self.rooms.values():
            out |= rr.peers() or {rr.bootstrap_addr}
        return out

    def snapshot(self) -> list[dict]:
        now = self.d.now()
        out = []
        for rr in self.rooms.values():
            tracker = rr.tracker
            out.append({"room": rr.room, "role": "decode", "engine_id": rr.pool.layout.engine_id,
                        "rank": rr.pool.layout.tp_rank,
                        "peer": ",".join(sorted(rr.peers())) or rr.bootstrap_addr,
                        "state": rr.machine.state.value + ("" if not rr.machine.state.final or rr.released
                                                           else " (unreleased)"),
                        "path": "hisparse" if rr.hisparse else "direct",
                        "bytes_done": rr.bytes_done, "bytes_total": rr.bytes_total,
                        "age_s": round(now - rr.machine.created_at, 3),
                        "senders_required": sorted(tracker.required) if tracker else [],
                        "senders_reported": sorted(tracker.reported) if tracker else []})
        return out
