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

from kvd.core.layout import LayoutError, PoolLayout, check_compatible
from kvd.core.planner import PlanError, TpMapping, map_heads, pages_to_tokens
from kvd.core.ring import RingError, RingSlot
from kvd.core.rooms import CompletionTracker, Deadlines, RoomError, RoomInput, RoomMachine, RoomState
from kvd.core.staging import (
    ChunkLedger,
    StagedWriter,
    StagingError,
    block_bytes_per_token,
    plan_chunks,
    staged_writers,
    staging_applies,
)
from kvd.mem.pools import LocalPool
from kvd.wire import protocol as p

if TYPE_CHECKING:
    from kvd.mem.stagemem import StagingPool
    from kvd.shell.daemon import Daemon

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
class StagedReceive:
    """A room on the staged path: its writers, chunk ledger and the regions it holds."""

    writers: tuple[StagedWriter, ...]
    ledger: ChunkLedger
    stage: StagingPool
    dst_tokens: np.ndarray
    slots: dict[int, RingSlot] = field(default_factory=dict)  # chunk -> receive-ring region
    landed: dict[int, int] = field(default_factory=dict)  # chunk -> bytes peers wrote into it
    scattering: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


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
    staged: StagedReceive | None = None

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
            willing = True
            for daemon in sorted(rr.peers()):
                willing &= await self.d.announce_pool(daemon, rr.pool, rr.prefill_engine_id, rr.machine)
            if willing and not staging_applies(layouts[0], local, hisparse=rr.hisparse):
                rr.staged = self._plan_staged(rr, mapping)
        except (LayoutError, PlanError) as exc:
            self.d.count_error("layout")
            self.fail(rr, str(exc))
            return
        except (TimeoutError, ConnectionError) as exc:
            self.fail(rr, str(exc) or "prefill bootstrap timed out")
            return
        if rr.machine.state.final:
            return
        st = rr.staged
        for link in rr.senders.values():
            writer = st.ledger.writer_index(link.rank) if st and not link.dummy else 0
            self.d.send_peer(link.daemon, p.TransferRequest(
                src=self.d.address, token=self.d.token, room=rr.room, transfer_id=rr.transfer_id,
                pool_key=rr.pool.key, prefill_engine_id=rr.prefill_engine_id, sender_rank=link.rank,
                dst_indices=np.empty(0, np.int64) if link.dummy else rr.dst_indices,
                dummy=link.dummy, deadline_s=rr.machine.deadlines.waiting_for_input,
                enable_hisparse=rr.hisparse,
                chunk_tokens=st.ledger.geometry.chunk_tokens if st and not link.dummy else 0,
                writer=writer, writers=len(st.writers) if st and not link.dummy else 0))
        self._apply(rr, RoomInput.BOOTSTRAPPED)
        self.d.room_paths["hisparse" if rr.hisparse else "staged" if st else "direct"] += 1
        if st is not None:
            st.task = asyncio.get_running_loop().create_task(self._grant_chunks(rr, st))

    # --- staged path --------------------------------------------------------------------
    def _plan_staged(self, rr: ReceiverRoom, mapping: TpMapping) -> StagedReceive | None:
        """Chunk plan of a staged room, or None (per-slice) when staging cannot express it."""
        stage = self.d.staging_pool(rr.pool)
        writers = staged_writers(mapping, rr.pool.layout.tp_rank)
        if stage is None or writers is None or len(rr.dst_indices) == 0:
            return None
        local, c = rr.pool.layout, self.d.config
        geometry = plan_chunks(len(rr.dst_indices) * local.page_size,
                               block_bytes_per_token(local, writers[0].num_heads), len(writers),
                               max_tokens=c.staging_chunk_tokens,
                               max_region_bytes=min(c.staging_chunk_bytes, stage.recv_bytes // 2),
                               page_size=local.page_size)
        return StagedReceive(writers, ChunkLedger(geometry, tuple(w.sender_rank for w in writers)), stage,
                             pages_to_tokens(rr.dst_indices, local.page_size))

    async def _grant_chunks(self, rr: ReceiverRoom, st: StagedReceive) -> None:
        """Reserve chunk regions a few ahead of the writes (the first ones at once: prefetch),
        waiting for space when the pool is full, and tell every writer where each one is."""
        ledger = st.ledger
        try:
            while not ledger.all_granted and not rr.machine.state.final:
                while ledger.outstanding >= self.d.config.staging_prefetch_chunks:
                    st.wake.clear()
                    await st.wake.wait()
                    if rr.machine.state.final:
                        return
                size = ledger.geometry.region_bytes(ledger.next_grant)
                deadline = rr.machine.deadline
                slot = await st.stage.recv.alloc(size, max(0.1, deadline - self.d.now()) if deadline else None)
                if rr.machine.state.final or rr.released:
                    st.stage.recv.free(slot.slot_id)
                    return
                chunk = ledger.grant(slot.offset)
                log.debug("staged_grant", room=rr.room, chunk=chunk, bytes=size)
                st.slots[chunk] = slot
                for w in st.writers:
                    link = rr.senders[w.sender_rank]
                    self.d.send_peer(link.daemon, p.StagingGrant(
                        src=self.d.address, token=self.d.token, room=rr.room, transfer_id=rr.transfer_id,
                        pool_key=rr.pool.key, sender_rank=w.sender_rank, chunk=chunk, offset=slot.offset))
        except TimeoutError:
            self.d.count_error("staging")
            self.fail(rr, f"no staging space for {ledger.geometry.region_bytes(ledger.next_grant)} bytes "
                          f"before the room's deadline (pool {st.stage.recv_bytes} bytes)")
        except RingError as exc:
            self.d.count_error("staging")
            self.fail(rr, f"staging: {exc}")

    def on_chunk_written(self, msg: p.ChunkWritten) -> None:
        rr = self._lookup(msg.transfer_id, msg.pool_key, msg.room)
        if rr is None:
            return
        link = rr.senders.get(msg.sender_rank)
        st = rr.staged
        try:
            if link is None or link.daemon != msg.src or st is None:
                raise StagingError(f"chunk report from unexpected sender rank {msg.sender_rank} at {msg.src}")
            complete = st.ledger.report(msg.chunk, msg.sender_rank, msg.nbytes)
        except StagingError as exc:
            self.d.count_error("bad_peer_message")
            self.fail(rr, str(exc))
            return
        link.bytes_written += msg.nbytes
        st.landed[msg.chunk] = st.landed.get(msg.chunk, 0) + msg.nbytes
        st.stage.data_bytes += msg.nbytes
        if rr.machine.state in (RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING):
            self._apply(rr, RoomInput.PROGRESS)
        if complete and not rr.machine.state.final:
            st.scattering += 1
            asyncio.get_running_loop().create_task(self._scatter(rr, st, msg.chunk))

    async def _scatter(self, rr: ReceiverRoom, st: StagedReceive, chunk: int) -> None:
        """Unpack one complete chunk into the pool, free its region, let the next one be granted."""
        geometry = st.ledger.geometry
        start, end = geometry.tokens(chunk)
        t0 = self.d.now()
        try:
            await self.d.kernels.scatter(st.stage.view(st.slots[chunk].offset, geometry.region_bytes(chunk)),
                                         rr.pool.tensors, st.dst_tokens[start:end],
                                         [w.dst_head_offset for w in st.writers], st.writers[0].num_heads)
        except (RuntimeError, ValueError, IndexError) as exc:
            st.scattering -= 1
            self.d.count_error("staging")
            self.fail(rr, f"scatter of chunk {chunk} failed: {exc}")
            return
        st.scattering -= 1
        log.debug("staged_scatter", room=rr.room, chunk=chunk, scatter_s=round(self.d.now() - t0, 4))
        st.ledger.scattered.add(chunk)
        self._free_region(st, chunk)
        st.wake.set()
        if rr.machine.state.final:
            self._maybe_release(rr)
        else:
            self._maybe_complete(rr)

    def _free_region(self, st: StagedReceive, chunk: int) -> None:
        slot = st.slots.pop(chunk, None)
        if slot is not None:
            st.stage.recv.free(slot.slot_id)
        st.stage.data_bytes -= st.landed.pop(chunk, 0)

    def _maybe_complete(self, rr: ReceiverRoom) -> None:
        if rr.tracker is None or not rr.tracker.done or rr.machine.state.final:
            return
        if rr.staged is not None and not rr.staged.ledger.done:
            return  # every sender finished; the last scatters are still running
        self._apply(rr, RoomInput.COMPLETED)
        self.d.observe_room(self.d.now() - rr.machine.created_at)
        self._maybe_release(rr)

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
            missing = rr.staged.ledger.missing_from(msg.sender_rank) if rr.staged else []
            if missing:
                raise StagingError(f"sender rank {msg.sender_rank} finished without writing chunks "
                                   f"{missing[:4]} of {rr.staged.ledger.geometry.num_chunks}")  # type: ignore[union-attr]
        except (RoomError, StagingError) as exc:
            self.d.count_error("bad_peer_message")
            self.fail(rr, str(exc))
            return
        if msg.aux and not rr.aux:
            rr.aux = msg.aux
        self._maybe_complete(rr)

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
        writers = [s.rank for s in rr.senders.values()
                   if not (s.dummy or s.final or s.acked or fence_over)]
        if rr.staged is not None and rr.staged.scattering:
            writers.append(-1)  # this daemon's own scatter into the pages
        return writers

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
        st = rr.staged
        if st is not None:  # no writer can land any more: the regions go back to the pool
            if st.task is not None and not st.task.done():
                st.task.cancel()
            for chunk in list(st.slots):
                self._free_region(st, chunk)
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
                        "path": "hisparse" if rr.hisparse else "staged" if rr.staged else "direct",
                        "chunks_done": len(rr.staged.ledger.scattered) if rr.staged else 0,
                        "chunks_total": rr.staged.ledger.geometry.num_chunks if rr.staged else 0,
                        "bytes_done": rr.bytes_done, "bytes_total": rr.bytes_total,
                        "age_s": round(now - rr.machine.created_at, 3),
                        "senders_required": sorted(tracker.required) if tracker else [],
                        "senders_reported": sorted(tracker.reported) if tracker else []})
        return out
