"""The staged receive pipeline: grant chunk regions ahead, count the writers, scatter, free.

The receiver reserves chunk regions of its staging pool as soon as the room is
bootstrapped, tells every writer where its block goes (``StagingGrant``), and when every
writer of a chunk has reported it scatters the region into the pool with one kernel call,
frees the region and grants the next one. The room succeeds only after its last scatter.

A stalled peer must not take the ring from the others: until a room's writers report their
first chunk it holds a single region (``prefetch_chunks`` only once bytes flow), and the regions
granted to one set of sender daemons and not yet written (every writer of the chunk reported)
are at most half the ring together, whether their rooms have started or not. Rooms of a prefill
daemon that accepts requests and then writes nothing, or stops after a first chunk, wait on
their own share, and every other peer's rooms still find space (a granted region is never taken
back: its writer may still land in it).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Protocol

import structlog

from kvd.core.planner import TpMapping, pages_to_tokens
from kvd.core.ring import RingError
from kvd.core.staging import ChunkLedger, StagingError, block_bytes_per_token, plan_chunks, staged_writers
from kvd.sides.context import RoomContext
from kvd.sides.records import ReceiverRoom, StagedReceive
from kvd.wire import peer as wp

log = structlog.get_logger("kvd.receiver")


class ReceiverHooks(Protocol):
    """What the pipeline reports back to the receiver side."""

    def fail(self, rm: ReceiverRoom, reason: str) -> None: ...
    def progress(self, rm: ReceiverRoom) -> None: ...
    def maybe_complete(self, rr: ReceiverRoom) -> None: ...
    def maybe_release(self, rr: ReceiverRoom) -> None: ...


class StagedReceiver:
    """The staged half of every receiver room that took the staged path."""

    def __init__(self, ctx: RoomContext, side: ReceiverHooks) -> None:
        self.ctx = ctx
        self.side = side
        # Ring bytes granted and not yet written, per (staging pool, sender daemons).
        self._unstarted: Counter[tuple[int, tuple[str, ...]]] = Counter()
        self._unstarted_fell = asyncio.Event()

    @staticmethod
    def _peers_key(rr: ReceiverRoom, st: StagedReceive) -> tuple[int, tuple[str, ...]]:
        return id(st.stage), tuple(sorted({rr.senders[w.sender_rank].daemon for w in st.writers
                                           if w.sender_rank in rr.senders}))

    async def _unstarted_share(self, rr: ReceiverRoom, st: StagedReceive, size: int) -> None:
        """Wait until the regions the room's sender daemons have not written yet leave room for
        ``size`` more bytes within half the ring (TimeoutError at the room's deadline); the room's
        ``unstarted_bytes`` are its regions not written yet."""
        key = self._peers_key(rr, st)
        share = max(size, st.stage.recv_bytes // 2)
        while self._unstarted[key] + size > share and not rr.machine.state.final:
            self._unstarted_fell.clear()
            deadline = rr.machine.deadline
            await asyncio.wait_for(self._unstarted_fell.wait(),
                                   max(0.1, deadline - self.ctx.now()) if deadline else None)
        if rr.machine.state.final:
            # Ended (or released) while it waited. Python 3.11's wait_for returns rather than
            # raise when the cancel of a released room's task meets a wait just granted: a share
            # taken now would never be given back.
            return
        st.unstarted_bytes += size
        self._unstarted[key] += size

    def _written(self, rr: ReceiverRoom, st: StagedReceive, size: int) -> None:
        """``size`` bytes of the room's regions were written (or it ended): their share goes back."""
        size = min(size, st.unstarted_bytes)
        if size > 0:
            key = self._peers_key(rr, st)
            self._unstarted[key] -= size
            if self._unstarted[key] <= 0:
                del self._unstarted[key]
            st.unstarted_bytes -= size
            self._unstarted_fell.set()

    def plan(self, rr: ReceiverRoom, mapping: TpMapping, send_ring_bytes: int = 0) -> StagedReceive | None:
        """Chunk plan of a staged room, or None (per-slice) when staging cannot express it.

        A chunk's region holds one block per writer, and each sender gathers its block into its
        own send ring: the chunk is sized so that a block fits half the smallest sender's ring
        (two in flight), as well as half of this daemon's receive ring."""
        stage = self.ctx.staging_pool(rr.pool)
        writers = staged_writers(mapping, rr.pool.layout.tp_rank)
        if stage is None or writers is None or len(rr.dst_indices) == 0:
            return None
        local, c = rr.pool.layout, self.ctx.config
        max_region = min(c.staging_chunk_bytes, stage.recv_bytes // 2)
        if send_ring_bytes > 0:
            max_region = min(max_region, len(writers) * (send_ring_bytes // 2))
        try:
            geometry = plan_chunks(len(rr.dst_indices) * local.page_size,
                                   block_bytes_per_token(local, writers[0].num_heads), len(writers),
                                   max_tokens=c.staging_chunk_tokens, max_region_bytes=max_region,
                                   page_size=local.page_size)
        except StagingError as exc:  # the rings cannot hold one token: per-slice, never a failed room
            log.warning("staging_not_possible", room=rr.room, error=str(exc))
            return None
        return StagedReceive(writers, ChunkLedger(geometry, tuple(w.sender_rank for w in writers)), stage,
                             pages_to_tokens(rr.dst_indices, local.page_size))

    async def grant_chunks(self, rr: ReceiverRoom, st: StagedReceive) -> None:
        """Reserve chunk regions a few ahead of the writes (the first ones at once: prefetch),
        waiting for space when the pool is full, and tell every writer where each one is."""
        ledger = st.ledger
        try:
            while not ledger.all_granted and not rr.machine.state.final:
                while ledger.outstanding >= (self.ctx.config.staging_prefetch_chunks if st.started else 1):
                    st.wake.clear()
                    await st.wake.wait()
                    if rr.machine.state.final:
                        return
                size = ledger.geometry.region_bytes(ledger.next_grant)
                await self._unstarted_share(rr, st, size)
                if rr.machine.state.final:
                    return
                deadline = rr.machine.deadline
                slot = await st.stage.recv.alloc(size, max(0.1, deadline - self.ctx.now()) if deadline else None)
                if rr.machine.state.final or rr.released:
                    st.stage.recv.free(slot.slot_id)
                    return
                chunk = ledger.grant(slot.offset)
                log.debug("staged_grant", room=rr.room, chunk=chunk, bytes=size)
                st.slots[chunk] = slot
                for w in st.writers:
                    link = rr.senders[w.sender_rank]
                    self.ctx.send_peer(link.daemon, wp.StagingGrant(
                        room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key,
                        sender_rank=w.sender_rank, chunk=chunk, offset=slot.offset))
        except TimeoutError:
            self.ctx.count_error("staging")
            self.side.fail(rr, f"no staging space for {ledger.geometry.region_bytes(ledger.next_grant)} bytes "
                               f"before the room's deadline (pool {st.stage.recv_bytes} bytes)")
        except RingError as exc:
            self.ctx.count_error("staging")
            self.side.fail(rr, f"staging: {exc}")

    def on_chunk_written(self, rr: ReceiverRoom, msg: wp.ChunkWritten) -> None:
        link = rr.senders.get(msg.sender_rank)
        st = rr.staged
        try:
            if link is None or link.daemon != msg.src or st is None:
                raise StagingError(f"chunk report from unexpected sender rank {msg.sender_rank} at {msg.src}")
            complete = st.ledger.report(msg.chunk, msg.sender_rank, msg.nbytes)
        except StagingError as exc:
            self.ctx.count_error("bad_peer_message")
            self.side.fail(rr, str(exc))
            return
        link.bytes_written += msg.nbytes
        if complete:  # every writer's block is in: the region is written, its share goes back
            self._written(rr, st, st.ledger.geometry.region_bytes(msg.chunk))
        if not st.started:  # bytes flow: the room may prefetch
            st.started = True
            st.wake.set()
        st.landed[msg.chunk] = st.landed.get(msg.chunk, 0) + msg.nbytes
        st.stage.data_bytes += msg.nbytes
        self.side.progress(rr)
        if complete and not rr.machine.state.final:
            st.scattering += 1
            self.ctx.spawn(self._scatter(rr, st, msg.chunk), f"scatter-{rr.room}-{msg.chunk}")

    async def _scatter(self, rr: ReceiverRoom, st: StagedReceive, chunk: int) -> None:
        """Unpack one complete chunk into the pool, free its region, let the next one be granted."""
        geometry = st.ledger.geometry
        start, end = geometry.tokens(chunk)
        t0 = self.ctx.now()
        try:
            await self.ctx.kernels.scatter(st.stage.view(st.slots[chunk].offset, geometry.region_bytes(chunk)),
                                           rr.pool.tensors, st.dst_tokens[start:end],
                                           [w.dst_head_offset for w in st.writers], st.writers[0].num_heads)
        except (RuntimeError, ValueError, IndexError) as exc:
            st.scattering -= 1
            self.ctx.count_error("staging")
            self.side.fail(rr, f"scatter of chunk {chunk} failed: {exc}")
            return
        st.scattering -= 1
        log.debug("staged_scatter", room=rr.room, chunk=chunk, scatter_s=round(self.ctx.now() - t0, 4))
        st.ledger.scattered.add(chunk)
        self._free_region(st, chunk)
        st.wake.set()
        if rr.machine.state.final:
            self.side.maybe_release(rr)
        else:
            self.side.maybe_complete(rr)

    def _free_region(self, st: StagedReceive, chunk: int) -> None:
        slot = st.slots.pop(chunk, None)
        if slot is not None:
            st.stage.recv.free(slot.slot_id)
        st.stage.data_bytes -= st.landed.pop(chunk, 0)

    def release(self, rr: ReceiverRoom, st: StagedReceive) -> None:
        """The room is released: no writer can land any more, every region goes back."""
        st.started = True
        self._written(rr, st, st.unstarted_bytes)
        for chunk in list(st.slots):
            self._free_region(st, chunk)


__all__ = ["StagedReceiver", "ReceiverHooks"]
