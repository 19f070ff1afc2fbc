"""The direct send path: plan each chunk against every receiver and write it, batch by batch.

Per sender room: chunks whose every write fits inline are done at once (:meth:`DirectSender.
drain_now`: no task, lock or await: a tiny room at engine rates); the others are written by one
drain task at a time under the room's lock (an abort answered after taking the lock is a fence:
no write of the room can still land). The drain plans the next batch while the last one is
being written, but batches land one after the other. Plans are ops (whole rows, merged into runs,
and runs of consecutive chunks joined) or row copies (a strided head slice: one kernel on the
same node, the same ops over the network); see :mod:`kvd.core.rows`.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from kvd.core.inline import pack_ops
from kvd.core.planner import PlanError, check_ops_within, expand_pages_to_tokens, pages_to_tokens
from kvd.core.rows import Plan, RowBatch, check_rows_within, join_plans, plan_slice, plan_slice_pages
from kvd.sides.context import RoomContext
from kvd.sides.records import Chunk, ReceiverRequest, SenderRoom
from kvd.transfer.base import TransportError, write_plan
from kvd.wire import peer as wp

log = structlog.get_logger("kvd.sender")

#: Chunks of more pages than this plan on page indices (kvd.core.planner, kvd.core.rows).
SMALL_PAGES = 16
#: Batches of one room written at once: the next one is queued on the device while the last
#: one copies, so the copy engine never waits for the event loop between batches.
MAX_BATCHES_IN_FLIGHT = 2


class DirectHooks(Protocol):
    """What the direct path reports back to the sender side."""

    def fail(self, rm: SenderRoom, reason: str) -> None: ...
    def progress(self, rm: SenderRoom) -> None: ...
    def maybe_complete(self, sr: SenderRoom) -> None: ...
    def status_message(self, req: ReceiverRequest, *, ok: bool, final: bool, reason: str = "",
                       aux: bytes = b"") -> wp.TransferStatus: ...


def _done_future() -> asyncio.Future[list[None]]:
    done: asyncio.Future[list[None]] = asyncio.get_running_loop().create_future()
    done.set_result([])
    return done


@dataclass
class _InFlight:
    """A batch being written while the next one is planned (or written too)."""

    writes: asyncio.Future[list[None]]
    batch: list[tuple[ReceiverRequest, Plan]]
    chunks: list[Chunk]


class DirectSender:
    """Every direct (non-staged) write of this daemon's sender rooms."""

    def __init__(self, ctx: RoomContext, side: DirectHooks) -> None:
        self.ctx = ctx
        self.side = side

    def _plan_batch(self, sr: SenderRoom, chunks: list[Chunk]) -> list[tuple[ReceiverRequest, Plan]]:
        """Every chunk's ops, one batch per receiver (a burst of small chunks: one round trip)."""
        if len(chunks) > 1:
            # The chunks of a burst continue one another on both sides: they plan as one (one
            # plan and one bounds check per batch, not per chunk: the event loop is what a
            # prefill daemon serving several ranks runs out of).
            # Lead pages: those before the burst's last non-empty chunk (an engine may end a room
            # with an empty chunk: the chunk before it is then the one that may end short).
            last_pages = next((i for i in range(len(chunks) - 1, -1, -1) if len(chunks[i].pages)), 0)
            chunks = [Chunk(np.concatenate([np.asarray(c.pages, dtype=np.int64) for c in chunks]),
                            chunks[-1].is_last, chunks[-1].aux,
                            lead_pages=sum(len(c.pages) for c in chunks[:last_pages]))]
        planned: dict[int, tuple[ReceiverRequest, list[Plan]]] = {}
        for chunk in chunks:
            for req, ops in self._plan_chunk(sr, chunk):
                planned.setdefault(id(req), (req, []))[1].append(ops)
        return [(req, join_plans(parts)) for req, parts in planned.values()]

    def drain_now(self, sr: SenderRoom) -> bool:
        """Chunks whose every write goes inline are done here, with no task, lock or await (a
        tiny room at engine rates, issue 15). Otherwise their planned batch is handed to
        :meth:`drain`, which writes it before any later chunk (False: spawn it)."""
        if sr.lock.locked() or sr.handoff is not None or sr.machine.state.final:
            return False
        chunks, sr.chunks = sr.chunks, []
        try:
            batch = self._plan_batch(sr, chunks)
        except PlanError as exc:
            self.ctx.count_error("plan")
            self.side.fail(sr, str(exc))
            return True
        if not all(self._fits_inline(sr, req, ops) for req, ops in batch):
            sr.handoff = (chunks, batch)
            return False
        for req, ops in batch:
            self._write_inline(sr, req, ops, hold=chunks[-1].is_last)
        self._batch_done(sr, chunks)
        return True

    def _batch_done(self, sr: SenderRoom, chunks: list[Chunk]) -> None:
        self.side.progress(sr)
        if chunks[-1].is_last:
            sr.aux = chunks[-1].aux
            sr.direct_done = True
            self.side.maybe_complete(sr)

    async def drain(self, sr: SenderRoom) -> None:
        """Write every chunk that is ready (a batch :meth:`drain_now` handed over first): one
        batch per receiver, receivers in parallel. The next batch is planned while the last one
        is still being written (planning a long chunk costs about as much as copying it on one
        machine), but batches land one after the other, all under the room's lock."""
        sr.draining = True  # (set by the spawner too: chunks that come before this runs are its)
        try:
            async with sr.lock:
                await self._drain_locked(sr)
        finally:
            sr.draining = False

    async def _drain_locked(self, sr: SenderRoom) -> None:
        in_flight: deque[_InFlight] = deque()
        try:
            while not sr.machine.state.final:
                if sr.handoff is None and not sr.chunks:
                    if not in_flight:
                        return
                    # Wait for the oldest write, or for a chunk to plan while the writes go on.
                    sr.more.clear()
                    more = asyncio.ensure_future(sr.more.wait())
                    try:
                        await asyncio.wait((in_flight[0].writes, more), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        more.cancel()
                    if in_flight[0].writes.done() and not await self._land(sr, in_flight.popleft()):
                        return
                    continue
                batch: list[tuple[ReceiverRequest, Plan]] | None = None
                if sr.handoff is not None:
                    (chunks, batch), sr.handoff = sr.handoff, None
                else:
                    chunks, sr.chunks = sr.chunks, []
                t0 = self.ctx.now()
                try:
                    if batch is None:
                        batch = self._plan_batch(sr, chunks)
                except PlanError as exc:
                    self.ctx.count_error("plan")
                    self.side.fail(sr, str(exc))
                    return
                log.debug("drain_batch", room=sr.room, chunks=len(chunks), plan_s=round(self.ctx.now() - t0, 6),
                          in_flight=len(in_flight))
                while len(in_flight) >= MAX_BATCHES_IN_FLIGHT:  # batches land in order: oldest first
                    if not await self._land(sr, in_flight.popleft()):
                        return
                # Planned before the last batches landed (or, handed over, before this task held
                # the lock): a receiver that aborted meanwhile gets nothing more.
                batch = [(req, ops) for req, ops in batch if not req.aborted]
                writes = []
                for req, ops in batch:
                    if self._fits_inline(sr, req, ops):
                        self._write_inline(sr, req, ops, hold=chunks[-1].is_last)
                    else:
                        writes.append(self._write(sr, req, ops))
                if not writes:
                    if in_flight:  # progress and completion stay in batch order
                        in_flight.append(_InFlight(_done_future(), batch, chunks))
                    else:
                        self._batch_done(sr, chunks)
                    continue
                in_flight.append(_InFlight(asyncio.gather(*writes), batch, chunks))
                # Let the writes reach the transport now (a copy queued behind the one running),
                # not after the next batch is planned.
                await asyncio.sleep(0)
        finally:
            # The room ended or a batch failed: the lock (the fence) is let go only once no
            # write of this room can still land.
            await self._settle(in_flight)

    async def _settle(self, in_flight: deque[_InFlight]) -> None:
        """Wait for every batch still in flight; one that fails leaves its receivers unsure."""
        while in_flight:
            landed = in_flight.popleft()
            try:
                await landed.writes
            except TransportError:
                for req, _ in landed.batch:
                    req.unsure = True

    async def _land(self, sr: SenderRoom, in_flight: _InFlight) -> bool:
        """Wait for a batch's writes; a failure fails the room (its bytes may still be in flight)."""
        try:
            await in_flight.writes
        except TransportError as exc:
            for req, _ in in_flight.batch:
                req.unsure = True
            self.ctx.count_error("transport")
            self.side.fail(sr, str(exc))
            return False
        if sr.machine.state.final:
            return False
        self._batch_done(sr, in_flight.chunks)
        return True

    async def _write(self, sr: SenderRoom, req: ReceiverRequest, ops: Plan) -> None:
        t0 = self.ctx.now()
        result = await write_plan(self.ctx.transport, req.remote.session_id, ops)
        # debug: where a room's time goes (issue 14: the per-room cost beside the copy itself)
        now = self.ctx.now()
        log.debug("direct_write", room=sr.room, rank=sr.pool.layout.tp_rank, ops=len(ops), bytes=result.nbytes,
                  copy_s=round(result.seconds, 6), device_s=round(result.device_seconds, 6), wall_s=round(now - t0, 6),
                  queued_s=round(result.started - t0, 6) if result.started else None,
                  back_s=round(now - result.ended, 6) if result.ended else None)
        self.ctx.observe_batch(result)
        sr.bytes_done += result.nbytes
        req.bytes_written += result.nbytes
        self.ctx.send_peer(req.msg.src, self.side.status_message(req, ok=True, final=False))

    def _fits_inline(self, sr: SenderRoom, req: ReceiverRequest, ops: Plan) -> bool:
        """Host to host, and no more bytes than both daemons allow: the bytes go in the status."""
        limit = min(req.msg.inline_max_bytes, self.ctx.config.inline_limit)
        # The ops ride along (16 bytes each): they count, so the message stays under the limit.
        data = ops.total_bytes
        return (data > 0 and data + 16 * len(ops) <= limit and sr.pool.layout.memory_kind == "host"
                and req.remote.layout.memory_kind == "host")

    def _write_inline(self, sr: SenderRoom, req: ReceiverRequest, plan: Plan, *, hold: bool) -> None:
        """Copy the (bounds-checked) source bytes into a status; the last batch's status is the
        final one, so a one-chunk room costs one message and no transport write."""
        ops = plan.ops() if isinstance(plan, RowBatch) else plan
        data = b"".join([ctypes.string_at(src, n) for src, n in zip(ops.src.tolist(), ops.length.tolist(), strict=True)])
        req.inline_ops, req.inline_data = pack_ops(ops), data
        req.inline_total += len(data)
        sr.bytes_done += len(data)
        req.bytes_written += len(data)
        self.ctx.observe_inline(len(data))
        if not hold:
            self.ctx.send_peer(req.msg.src, self.side.status_message(req, ok=True, final=False))

    def _plan_chunk(self, sr: SenderRoom, chunk: Chunk) -> list[tuple[ReceiverRequest, Plan]]:
        """Write ops of one chunk for every live receiver, bounds-checked on both sides."""
        local = sr.pool.layout
        src_count = len(chunk.pages) * local.page_size
        sr.src_pages_done += len(chunk.pages)
        out = []
        for req in sr.requests.values():
            if req.dummy or req.aborted or req.staged is not None:
                continue
            dst_all = req.msg.dst_indices
            start = req.dst_cursor
            if req.msg.enable_hisparse and src_count == 0:
                # An empty chunk (an engine may end a room with one): nothing to write; the
                # last-chunk check below still holds the room to its token count.
                src = dst = np.zeros(0, dtype=np.int64)
            elif req.msg.enable_hisparse:
                remaining = len(dst_all) - start
                n = min(src_count, remaining)
                # Only the room's final page may end short: every page before it in the chunk
                # fits whole. That page may close a chunk that is not marked last (an engine may
                # end a room with an empty chunk); any chunk with pages after it finds no room.
                if remaining <= 0 or (len(chunk.pages) - 1) * local.page_size >= remaining \
                        or chunk.lead_pages * local.page_size >= remaining:
                    raise PlanError(f"sender sent more tokens than the receiver's {len(dst_all)}")
                src = expand_pages_to_tokens(chunk.pages, local.page_size, n)
                dst = dst_all[start:start + n]
                req.dst_cursor += n
            else:
                if start + len(chunk.pages) > len(dst_all):
                    raise PlanError(f"sender sent {start + len(chunk.pages)} pages, the receiver asked "
                                    f"for {len(dst_all)}")
                dst_pages = dst_all[start:start + len(chunk.pages)]
                req.dst_cursor += len(chunk.pages)
                if len(chunk.pages) > SMALL_PAGES and all(
                        p.sender.page_size == p.receiver.page_size for p in req.planners):
                    pages_plan = [plan_slice_pages(p, chunk.pages, dst_pages) for p in req.planners]
                    if chunk.is_last and req.dst_cursor != len(dst_all):
                        raise PlanError(f"last chunk leaves {len(dst_all) - req.dst_cursor} of the receiver's "
                                        f"{len(dst_all)} pages unwritten")
                    ops = join_plans(pages_plan)
                    self._check_plan(sr, req, ops)
                    out.append((req, ops))
                    continue
                dst = pages_to_tokens(dst_pages, req.remote.layout.page_size)
                src = pages_to_tokens(chunk.pages, local.page_size)
            if chunk.is_last and req.dst_cursor != len(dst_all):
                raise PlanError(f"last chunk leaves {len(dst_all) - req.dst_cursor} of the receiver's "
                                f"{len(dst_all)} {'tokens' if req.msg.enable_hisparse else 'pages'} unwritten")
            ops = join_plans(plan_slice(planner, src, dst) for planner in req.planners)
            self._check_plan(sr, req, ops)
            out.append((req, ops))
        return out

    @staticmethod
    def _check_plan(sr: SenderRoom, req: ReceiverRequest, ops: Plan) -> None:
        """Every byte read from our pool and written into the receiver's announced one."""
        if isinstance(ops, RowBatch):  # a strided slice: spans checked, never expanded here
            check_rows_within(ops, req.remote.region_index, f"write into {req.remote.key}")
            check_rows_within(ops, sr.pool.region_index, "read from the local pool", side="src")
        else:
            check_ops_within(ops, req.remote.region_index, f"write into {req.remote.key}")
            check_ops_within(ops, sr.pool.region_index, "read from the local pool", side="src")
