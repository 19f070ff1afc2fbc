"""Prefill side of a room: match engine chunks with decode requests and write them.

A sender room is one (prefill engine, sender rank, room). It collects the per-room
requests of every receiver rank the TP mapping says it serves, and the chunks the
engine reports as chunked prefill produces them; each chunk is planned against
every request and written in one batch per receiver. All writes of a room happen
under the room's lock, so an abort answered after taking the lock is a fence: no
write of that room can still land.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog

from kvd.core.layout import LayoutError, check_compatible
from kvd.core.planner import (
    HeadSlice,
    PlanError,
    WriteOps,
    check_ops_within,
    expand_pages_to_tokens,
    map_heads,
    pages_to_tokens,
    plan_direct_writes,
)
from kvd.core.ring import RingError
from kvd.core.rooms import Deadlines, RoomInput, RoomMachine
from kvd.core.staging import ChunkGeometry, StagingError, block_bytes_per_token, check_grant
from kvd.mem.pools import LocalPool, RemotePool, check_page_indices
from kvd.transfer.mooncake import TransportError
from kvd.wire import protocol as p

if TYPE_CHECKING:
    from kvd.shell.daemon import Daemon

log = structlog.get_logger("kvd.sender")


@dataclass
class StagedSend:
    """A request on the staged path: chunk geometry, the receiver's grants, progress."""

    geometry: ChunkGeometry
    writer: int
    grants: dict[int, int] = field(default_factory=dict)  # chunk -> region offset at the receiver
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    done: bool = False
    chunks_written: int = 0
    not_gathering: asyncio.Event = field(default_factory=asyncio.Event)  # set: no kernel reads the pool

    def __post_init__(self) -> None:
        self.not_gathering.set()


@dataclass
class ReceiverRequest:
    """One decode rank's request to this sender for a room."""

    msg: p.TransferRequest
    remote: RemotePool
    slices: tuple[HeadSlice, ...]
    dst_cursor: int = 0  # pages (or HiSparse tokens) of dst_indices already written
    aborted: bool = False
    reported: bool = False
    staged: StagedSend | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # fence of this request's staged writes

    @property
    def dummy(self) -> bool:
        return not self.slices


@dataclass
class Chunk:
    pages: np.ndarray
    is_last: bool
    aux: bytes


@dataclass
class SenderRoom:
    pool: LocalPool
    room: int
    machine: RoomMachine
    requests: dict[tuple[str, int], ReceiverRequest] = field(default_factory=dict)
    expected: int | None = None
    chunks: list[Chunk] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    got_last: bool = False
    src_pages_done: int = 0
    pages_received: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    aux: bytes = b""
    path: str = "direct"
    engine_told: bool = False
    direct_done: bool = False  # every chunk of the per-slice requests is written
    src_tokens: list[np.ndarray] = field(default_factory=list)  # room tokens so far (staged path)
    src_token_count: int = 0

    def tokens_upto(self, end: int) -> np.ndarray:
        """The room's first ``end`` source tokens (the engine's chunks, concatenated once)."""
        if len(self.src_tokens) > 1:
            self.src_tokens = [np.concatenate(self.src_tokens)]
        return self.src_tokens[0][:end]

    def staged(self) -> list[ReceiverRequest]:
        return [r for r in self.requests.values() if r.staged is not None]

    @property
    def key(self) -> tuple[int, int]:
        return (self.pool.pool_id, self.room)


class SenderSide:
    """Every sender room of this daemon, driven by engine chunks and peer requests."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.rooms: dict[tuple[int, int], SenderRoom] = {}
        # (transfer id, sender rank) pairs that ended or were aborted: a late request for one is
        # dropped. Per rank: every sender rank of a room shares the transfer id, and a replica's
        # dummy request may arrive after the real sender has finished.
        self._ended: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._staged: dict[tuple[int, int], tuple[SenderRoom, ReceiverRequest]] = {}

    def _deadlines(self) -> Deadlines:
        c = self.d.config
        return Deadlines(c.waiting_timeout_s, c.waiting_timeout_s, c.transfer_timeout_s)

    def _room(self, pool: LocalPool, room: int) -> SenderRoom:
        sr = self.rooms.get((pool.pool_id, room))
        if sr is None:
            sr = SenderRoom(pool, room, RoomMachine(self._deadlines(), self.d.now()))
            self.rooms[sr.key] = sr
            self.d.room_changed("prefill", None, sr.machine.state, room=room, pool=pool.key)
        return sr

    # --- inputs -------------------------------------------------------------------------
    def on_chunk(self, pool: LocalPool, msg: p.SendChunk) -> None:
        """The engine produced pages of a room (validated by the caller)."""
        live = self.rooms.get((pool.pool_id, msg.room))
        if live is None and msg.page_offset > 0:
            raise PlanError(f"room {msg.room} is not in flight (it ended, or its first chunk never "
                            f"came): chunk at page offset {msg.page_offset} dropped")
        if live is not None and msg.page_offset >= 0 and msg.page_offset != live.pages_received:
            raise PlanError(f"room {msg.room}: chunk at page offset {msg.page_offset}, expected "
                            f"{live.pages_received} (a chunk was lost or repeated)")
        sr = self._room(pool, msg.room)
        sr.pages_received += len(msg.pages)
        if sr.machine.state.final:
            raise PlanError(f"room {msg.room} already ended ({sr.machine.state.value})")
        if sr.got_last:
            raise PlanError(f"room {msg.room} already got its last chunk")
        sr.chunks.append(Chunk(msg.pages, msg.is_last, msg.aux))
        sr.got_last = msg.is_last
        sr.src_tokens.append(pages_to_tokens(msg.pages, pool.layout.page_size))
        sr.src_token_count += len(msg.pages) * pool.layout.page_size
        for req in sr.staged():
            req.staged.wake.set()  # type: ignore[union-attr]
        self._kick(sr)

    def on_request(self, msg: p.TransferRequest) -> None:
        """A decode daemon asks this sender rank to write a room."""
        if (msg.transfer_id, msg.sender_rank) in self._ended:
            self.d.count_error("stale_message")
            return
        pool = self.d.prefill_pool(msg.prefill_engine_id, msg.sender_rank)
        remote = self.d.remote_pools.get(msg.pool_key)
        problem = None
        if pool is None:
            problem = f"no prefill rank {msg.prefill_engine_id}/{msg.sender_rank} is served here"
        elif remote is None:
            problem = f"decode pool {msg.pool_key} was never announced"
        if problem:
            self.d.count_error("bad_request")
            self._reply(msg, ok=False, reason=problem)
            return
        assert pool is not None and remote is not None
        sr = self._room(pool, msg.room)
        try:
            req = self._validate_request(sr, msg, remote)
        except (PlanError, LayoutError) as exc:
            self.d.count_error("bad_request")
            self._reply(msg, ok=False, reason=str(exc))
            self._fail(sr, f"bad request from {msg.src}: {exc}")
            return
        rkey = (msg.pool_key, remote.layout.tp_rank)
        if rkey in sr.requests:
            self.d.count_error("bad_request")
            self._fail(sr, f"receiver {rkey} asked twice for room {msg.room}")
            return
        sr.requests[rkey] = req
        if msg.enable_hisparse:
            sr.path = "hisparse"
        if req.staged is not None:
            sr.path = "staged"
            self._staged[(msg.transfer_id, msg.sender_rank)] = (sr, req)
        if sr.machine.state.final:
            self._reply(msg, ok=False, reason=sr.machine.reason or "room already ended")
            return
        self._kick(sr)

    def _validate_request(self, sr: SenderRoom, msg: p.TransferRequest,
                          remote: RemotePool) -> ReceiverRequest:
        local = sr.pool.layout
        check_compatible(local, remote.layout)
        if msg.enable_hisparse != remote.layout.hisparse:
            raise PlanError("enable_hisparse does not match the receiver pool "
                            f"(request {msg.enable_hisparse}, pool hisparse {remote.layout.hisparse})")
        mapping = map_heads(local.total_kv_heads, local.tp_size, remote.layout.tp_size)
        slices = mapping.slices_between(local.tp_rank, remote.layout.tp_rank)
        if bool(slices) == msg.dummy:
            raise PlanError(
                f"receiver rank {remote.layout.tp_rank} asks for "
                f"{'nothing' if msg.dummy else 'heads'} but sender rank {local.tp_rank} holds "
                f"{'heads it needs' if slices else 'none of its heads'}")
        expected = len(mapping.receivers_of(local.tp_rank))
        if sr.expected is not None and sr.expected != expected:
            raise PlanError(f"receivers disagree on the layout: {expected} vs {sr.expected} receivers")
        sr.expected = expected
        if not msg.dummy:
            dst = msg.dst_indices
            if msg.enable_hisparse:
                remote.check_tokens(dst, "destination token indices")
            else:
                check_page_indices(dst, remote.layout.num_pages, "destination pages")
        staged = None
        if msg.chunk_tokens and not msg.dummy:
            staged = self._validate_staged(sr, msg, remote, slices)
        return ReceiverRequest(msg, remote, slices, staged=staged)

    def _validate_staged(self, sr: SenderRoom, msg: p.TransferRequest, remote: RemotePool,
                         slices: tuple[HeadSlice, ...]) -> StagedSend:
        if self.d.staging_pool(sr.pool) is None:
            raise StagingError("the receiver asked for the staged path but staging is off on this daemon")
        if remote.staging_bytes <= 0:
            raise StagingError(f"decode pool {remote.key} announced no staging pool")
        if len(slices) != 1:
            raise StagingError(f"the staged path needs one head run per pair, this pair has {len(slices)}")
        if msg.enable_hisparse:
            raise StagingError("HiSparse rooms do not take the staged path")
        if not 0 <= msg.writer < msg.writers:
            raise StagingError(f"writer {msg.writer} outside the chunk's {msg.writers} writers")
        local = sr.pool.layout
        geometry = ChunkGeometry(len(msg.dst_indices) * local.page_size, msg.chunk_tokens, msg.writers,
                                 block_bytes_per_token(local, slices[0].num_heads))
        if geometry.region_bytes(0) > remote.staging_bytes:
            raise StagingError(f"a chunk region of {geometry.region_bytes(0)} bytes exceeds the receiver's "
                               f"{remote.staging_bytes}-byte staging pool")
        return StagedSend(geometry, msg.writer)

    def on_grant(self, msg: p.StagingGrant) -> None:
        """The receiver reserved chunk ``msg.chunk``'s region: check it lies in its staging pool."""
        found = self._staged.get((msg.transfer_id, msg.sender_rank))
        if found is None or found[1].msg.pool_key != msg.pool_key or found[1].msg.src != msg.src:
            self.d.count_error("stale_message")
            return
        sr, req = found
        st = req.staged
        assert st is not None
        try:
            check_grant(st.geometry, msg.chunk, msg.offset, req.remote.staging_bytes)
            if msg.chunk in st.grants or msg.chunk < st.chunks_written:
                raise StagingError(f"chunk {msg.chunk} granted twice")
        except StagingError as exc:
            self.d.count_error("bad_peer_message")
            self._fail(sr, f"bad staging grant from {msg.src}: {exc}")
            return
        st.grants[msg.chunk] = msg.offset
        st.wake.set()

    def on_abort(self, msg: p.AbortTransfer) -> None:
        self._ended[(msg.transfer_id, msg.sender_rank)] = None
        self._trim()
        asyncio.get_running_loop().create_task(self._abort(msg))

    async def _abort(self, msg: p.AbortTransfer) -> None:
        found = None
        for sr in list(self.rooms.values()):
            for req in sr.requests.values():
                if req.msg.transfer_id == msg.transfer_id and req.msg.sender_rank == msg.sender_rank:
                    found = (sr, req)
        if found:
            sr, req = found
            req.aborted = True
            if req.staged is not None:
                req.staged.wake.set()
            async with sr.lock, req.lock:  # fence: the batch in flight (if any) has finished
                pass
            self._fail(sr, f"aborted by receiver: {msg.reason or 'abort'}")
        self.d.send_peer(msg.src, p.AbortAck(src=self.d.address, token=self.d.token, room=msg.room,
                                             transfer_id=msg.transfer_id, pool_key=msg.pool_key,
                                             sender_rank=msg.sender_rank))

    def abort_from_engine(self, pool: LocalPool, room: int, reason: str) -> None:
        sr = self.rooms.get((pool.pool_id, room))
        if sr is not None:
            self._fail(sr, reason)

    # --- work ---------------------------------------------------------------------------
    def _kick(self, sr: SenderRoom) -> None:
        now = self.d.now()
        if sr.expected is not None and len(sr.requests) >= sr.expected \
                and sr.machine.state.value == "bootstrapping":
            self._transition(sr, RoomInput.BOOTSTRAPPED, now)
        if sr.machine.state.value in ("waiting_for_input", "transferring"):
            if sr.chunks:
                asyncio.get_running_loop().create_task(self._drain(sr))
            for req in sr.staged():
                assert req.staged is not None
                if not req.staged.started:
                    req.staged.started = True
                    asyncio.get_running_loop().create_task(self._run_staged(sr, req))

    async def _drain(self, sr: SenderRoom) -> None:
        """Write every chunk that is ready: all of them planned first, then one batch per
        receiver (receivers in parallel), so a burst of small chunks costs one round trip."""
        async with sr.lock:
            while sr.chunks and not sr.machine.state.final:
                chunks, sr.chunks = sr.chunks, []
                try:
                    planned: dict[int, tuple[ReceiverRequest, list[WriteOps]]] = {}
                    for chunk in chunks:
                        for req, ops in self._plan_chunk(sr, chunk):
                            planned.setdefault(id(req), (req, []))[1].append(ops)
                    await asyncio.gather(*(self._write(sr, req, WriteOps.concat(parts))
                                           for req, parts in planned.values()))
                except (PlanError, TransportError) as exc:
                    self.d.count_error("transport" if isinstance(exc, TransportError) else "plan")
                    self._fail(sr, str(exc))
                    return
                if sr.machine.state.value in ("waiting_for_input", "transferring"):
                    self._transition(sr, RoomInput.PROGRESS, self.d.now())
                if chunks[-1].is_last:
                    sr.aux = chunks[-1].aux
                    sr.direct_done = True
                    self._maybe_complete(sr)

    # --- staged path --------------------------------------------------------------------
    async def _run_staged(self, sr: SenderRoom, req: ReceiverRequest) -> None:
        """Gather chunk c+1 while chunk c is on the wire; one bulk write per chunk, in order."""
        st = req.staged
        assert st is not None
        stage = self.d.staging_pool(sr.pool)
        assert stage is not None
        writing: asyncio.Task | None = None
        try:
            for chunk in range(st.geometry.num_chunks):
                start, end = st.geometry.tokens(chunk)
                while not self._staged_ready(sr, req, chunk, end):
                    st.wake.clear()
                    if not self._staged_ready(sr, req, chunk, end):
                        await st.wake.wait()
                if req.aborted or sr.machine.state.final:
                    return
                block = st.geometry.block_bytes(chunk)
                t_ready = self.d.now()
                slot = await stage.send.alloc(block, self._time_left(sr))
                t_slot = self.d.now()
                st.not_gathering.clear()
                try:
                    await self.d.kernels.gather(sr.pool.tensors, sr.tokens_upto(end)[start:],
                                                req.slices[0].src_head_offset, req.slices[0].num_heads,
                                                stage.send_view(slot.offset, block))
                except BaseException:
                    stage.send.free(slot.slot_id)
                    raise
                finally:
                    st.not_gathering.set()
                t_gathered = self.d.now()
                if writing is not None:
                    try:
                        await writing
                    except BaseException:
                        stage.send.free(slot.slot_id)  # gathered, never handed to a write
                        raise
                log.debug("staged_gather", room=sr.room, chunk=chunk, rank=req.msg.sender_rank,
                          wait_slot_s=round(t_slot - t_ready, 4), gather_s=round(t_gathered - t_slot, 4),
                          wait_previous_write_s=round(self.d.now() - t_gathered, 4))
                writing = asyncio.get_running_loop().create_task(self._write_staged(sr, req, chunk, slot))
            if writing is not None:
                await writing
                writing = None
            st.done = True
            self._maybe_complete(sr)
        except (PlanError, TransportError, RingError, TimeoutError, RuntimeError, ValueError, IndexError) as exc:
            if req.aborted or sr.machine.state.final:
                return  # the room ended under us: its failure is already reported
            self.d.count_error("transport" if isinstance(exc, TransportError) else "staging")
            self._fail(sr, f"staged write to {req.msg.src} failed: {exc or 'no staging space in time'}")
        finally:
            if writing is not None:
                await asyncio.gather(writing, return_exceptions=True)

    def _staged_ready(self, sr: SenderRoom, req: ReceiverRequest, chunk: int, end: int) -> bool:
        """Whether chunk ``chunk`` can go (its tokens exist and its region is granted); raises when
        the engine's last chunk leaves the room's token count different from the receiver's."""
        st = req.staged
        assert st is not None
        if req.aborted or sr.machine.state.final:
            return True
        total = st.geometry.total_tokens
        if sr.src_token_count > total or (sr.got_last and sr.src_token_count != total):
            raise PlanError(f"the prefill engine sent {sr.src_token_count} tokens{'' if sr.got_last else ' so far'}, "
                            f"the receiver asked for {total}")
        return sr.src_token_count >= end and chunk in st.grants

    async def _write_staged(self, sr: SenderRoom, req: ReceiverRequest, chunk: int, slot) -> None:
        st = req.staged
        stage = self.d.staging_pool(sr.pool)
        assert st is not None and stage is not None
        try:
            async with req.lock:  # an abort answered after this lock sees no later write
                if req.aborted or sr.machine.state.final:
                    raise PlanError("room ended while its chunk was gathered")
                dst, nbytes = st.geometry.slot(st.grants[chunk], chunk, st.writer)
                src = np.array([stage.send_address(slot.offset)], np.int64)
                result = await self.d.transport.write(
                    req.remote.session_id, src, np.array([req.remote.staging_base + dst], np.int64),
                    np.array([nbytes], np.int64))
        finally:
            stage.send.free(slot.slot_id)
        self.d.observe_batch(result)
        log.debug("staged_write", room=sr.room, chunk=chunk, rank=req.msg.sender_rank, bytes=result.nbytes,
                  write_s=round(result.seconds, 4))
        sr.bytes_done += result.nbytes
        st.chunks_written = chunk + 1
        del st.grants[chunk]
        m = req.msg
        self.d.send_peer(m.src, p.ChunkWritten(src=self.d.address, token=self.d.token, room=m.room,
                                               transfer_id=m.transfer_id, pool_key=m.pool_key,
                                               sender_rank=m.sender_rank, chunk=chunk, nbytes=nbytes))
        if sr.machine.state.value in ("waiting_for_input", "transferring"):
            self._transition(sr, RoomInput.PROGRESS, self.d.now())

    def _time_left(self, sr: SenderRoom) -> float:
        deadline = sr.machine.deadline
        return max(0.1, deadline - self.d.now()) if deadline is not None else 60.0

    def _maybe_complete(self, sr: SenderRoom) -> None:
        if sr.machine.state.final or not sr.direct_done:
            return
        if all(r.staged is None or r.staged.done or r.aborted for r in sr.requests.values()):
            self._complete(sr, sr.aux)

    async def _write(self, sr: SenderRoom, req: ReceiverRequest, ops: WriteOps) -> None:
        result = await self.d.transport.write(req.remote.session_id, ops.src, ops.dst, ops.length)
        self.d.observe_batch(result)
        sr.bytes_done += result.nbytes
        self.d.send_peer(req.msg.src, self._status(req, ok=True, final=False, nbytes=sr.bytes_done))

    def _plan_chunk(self, sr: SenderRoom, chunk: Chunk) -> list[tuple[ReceiverRequest, WriteOps]]:
        """Write ops of one chunk for every live receiver, bounds-checked on both sides."""
        local = sr.pool.layout
        src_tokens = pages_to_tokens(chunk.pages, local.page_size)
        sr.src_pages_done += len(chunk.pages)
        out = []
        for req in sr.requests.values():
            if req.dummy or req.aborted or req.staged is not None:
                continue
            dst_all = req.msg.dst_indices
            if req.msg.enable_hisparse:
                start = req.dst_cursor
                remaining = len(dst_all) - start
                if remaining <= 0:
                    raise PlanError(f"sender sent more tokens than the receiver's {len(dst_all)}")
                n = min(len(src_tokens), remaining)
                if not chunk.is_last and n < len(src_tokens):
                    raise PlanError(f"sender sent more tokens than the receiver's {len(dst_all)}")
                src = expand_pages_to_tokens(chunk.pages, local.page_size, n)
                dst = dst_all[start:start + n]
                req.dst_cursor += n
            else:
                start = req.dst_cursor
                if start + len(chunk.pages) > len(dst_all):
                    raise PlanError(f"sender sent {start + len(chunk.pages)} pages, the receiver asked "
                                    f"for {len(dst_all)}")
                dst = pages_to_tokens(dst_all[start:start + len(chunk.pages)], req.remote.layout.page_size)
                src = src_tokens
                req.dst_cursor += len(chunk.pages)
            if chunk.is_last and req.dst_cursor != len(dst_all):
                raise PlanError(f"last chunk leaves {len(dst_all) - req.dst_cursor} of the receiver's "
                                f"{len(dst_all)} {'tokens' if req.msg.enable_hisparse else 'pages'} unwritten")
            ops = WriteOps.concat([plan_direct_writes(local, sr.pool.buffers, src, req.remote.layout,
                                                      req.remote.buffers, dst, s) for s in req.slices])
            check_ops_within(ops, req.remote.regions(), f"write into {req.remote.key}")
            check_ops_within(ops, sr.pool.regions(), "read from the local pool", side="src")
            out.append((req, ops))
        return out

    def _complete(self, sr: SenderRoom, aux: bytes) -> None:
        sr.aux = aux
        for req in sr.requests.values():
            if not req.aborted:
                req.reported = True
                self.d.send_peer(req.msg.src, self._status(req, ok=True, final=True, aux=aux,
                                                           nbytes=sr.bytes_done))
        self._transition(sr, RoomInput.COMPLETED, self.d.now())
        self._finish(sr)

    def _fail(self, sr: SenderRoom, reason: str) -> None:
        if not sr.machine.fail(self.d.now(), reason):
            return
        self.d.room_changed("prefill", None, sr.machine.state, room=sr.room, pool=sr.pool.key,
                            reason=reason)
        # Tell receivers only once no batch of this room is in flight.
        asyncio.get_running_loop().create_task(self._fail_after_fence(sr, reason))

    async def _fail_after_fence(self, sr: SenderRoom, reason: str) -> None:
        for req in sr.staged():
            req.staged.wake.set()  # type: ignore[union-attr]
            await req.staged.not_gathering.wait()  # type: ignore[union-attr]  # pool may be unmapped after
            async with req.lock:
                pass
        async with sr.lock:
            for req in sr.requests.values():
                if not req.reported and not req.aborted:
                    req.reported = True
                    self.d.send_peer(req.msg.src, self._status(req, ok=False, final=True, reason=reason))
            self._finish(sr)

    def _finish(self, sr: SenderRoom) -> None:
        for req in sr.requests.values():
            self._ended[(req.msg.transfer_id, req.msg.sender_rank)] = None
            self._staged.pop((req.msg.transfer_id, req.msg.sender_rank), None)
        self._trim()
        if self.rooms.get(sr.key) is sr:
            del self.rooms[sr.key]
        if not sr.engine_told:
            sr.engine_told = True
            self.d.tell_engine(sr.pool, p.RoomEvent(req_id=0, room=sr.room, state=sr.machine.state.value,
                                                    reason=sr.machine.reason, bytes_done=sr.bytes_done,
                                                    bytes_total=sr.bytes_done, released=True))

    def _transition(self, sr: SenderRoom, event: RoomInput, now: float) -> None:
        before = sr.machine.state
        after = sr.machine.apply(event, now)
        if after is not before:
            self.d.room_changed("prefill", before, after, room=sr.room, pool=sr.pool.key)

    def _status(self, req: ReceiverRequest, *, ok: bool, final: bool, reason: str = "",
                aux: bytes = b"", nbytes: int = 0) -> p.TransferStatus:
        m = req.msg
        return p.TransferStatus(src=self.d.address, token=self.d.token, room=m.room,
                                transfer_id=m.transfer_id, pool_key=m.pool_key,
                                sender_rank=m.sender_rank, ok=ok, reason=reason, aux=aux,
                                bytes_written=nbytes, final=final)

    def _reply(self, msg: p.TransferRequest, *, ok: bool, reason: str) -> None:
        self.d.send_peer(msg.src, p.TransferStatus(
            src=self.d.address, token=self.d.token, room=msg.room, transfer_id=msg.transfer_id,
            pool_key=msg.pool_key, sender_rank=msg.sender_rank, ok=ok, reason=reason, final=True))

    def _trim(self) -> None:
        while len(self._ended) > 100_000:
            self._ended.popitem(last=False)

    # --- housekeeping -------------------------------------------------------------------
    def expire(self, now: float) -> None:
        for sr in list(self.rooms.values()):
            if sr.machine.expired(now):
                self.d.count_error("timeout")
                self._fail(sr, sr.machine.timeout_reason())

    def peer_dead(self, peer: str) -> None:
        for sr in list(self.rooms.values()):
            if any(r.msg.src == peer for r in sr.requests.values()):
                for r in sr.requests.values():
                    if r.msg.src == peer:
                        r.aborted = True
                self._fail(sr, f"decode daemon {peer} stopped answering heartbeats")

    def pool_closed(self, pool: LocalPool) -> None:
        for sr in list(self.rooms.values()):
            if sr.pool is pool:
                self._fail(sr, "the prefill engine disconnected")

    def snapshot(self) -> list[dict]:
        now = self.d.now()
        out = []
        for sr in self.rooms.values():
            peers = sorted({r.msg.src for r in sr.requests.values()})
            out.append({"room": sr.room, "role": "prefill", "engine_id": sr.pool.layout.engine_id,
                        "rank": sr.pool.layout.tp_rank, "peer": ",".join(peers) or "-",
                        "state": sr.machine.state.value, "path": sr.path, "bytes_done": sr.bytes_done,
                        "bytes_total": sr.bytes_total or sr.bytes_done,
                        "age_s": round(now - sr.machine.created_at, 3),
                        "senders_required": [], "senders_reported": []})
        return out
