"""Decode side of a room: find the prefill senders, ask them, count their reports, release.

A receiver room is one (decode pool, room). It resolves the prefill engine's
topology through the engine's directory daemon, announces the decode pool to every
sender daemon once, sends one request per sender rank the TP mapping names, and
counts final reports per sender *engine rank*. A room that fails asks its senders
to stop and is released to the engine only when each sender that could still
write has acknowledged (or its daemon is dead and the fence time has passed).
The staged pipeline lives in :mod:`kvd.sides.staged_recv`.
"""

from __future__ import annotations

import ctypes
import math
import secrets
from collections import Counter, OrderedDict

import numpy as np

from kvd.core.inline import check_within_indices, unpack_ops
from kvd.core.layout import LayoutError, PoolLayout, check_compatible
from kvd.core.planner import PlanError, TpMapping, check_distinct, map_heads
from kvd.core.rooms import (
    CompletionTracker,
    Deadlines,
    RoomError,
    RoomInput,
    RoomMachine,
    RoomState,
    TooManyRooms,
    TransferPath,
)
from kvd.core.staging import StagingError, staging_applies
from kvd.mem.pools import LocalPool
from kvd.sides.context import PoolAccepted, RoomContext
from kvd.sides.give_up import GivenUp, GiveUpNotices
from kvd.sides.lifecycle import SideBase, room_event
from kvd.sides.records import ReceiverRoom, SenderLink
from kvd.sides.staged_recv import StagedReceiver
from kvd.wire import engine as we
from kvd.wire import peer as wp

RELEASED_KEPT = 65_536  # transfer ids whose late messages are expected, not counted
#: Progress statuses a sender rank may send beyond one per destination index of the room. A
#: sender reports once per written batch, and every batch fills at least one page (or HiSparse
#: token) of the room: more is a peer keeping the room alive a byte at a time.
STATUS_SLACK = 16
#: Destination indices a pool's unreleased rooms may name together: this many times the pool's
#: capacity, plus DESTINATIONS_SLACK. Live rooms of a sane engine never share a destination (two
#: rooms writing one page corrupt each other; pages are reused once their room is released), so
#: together they name at most the pool; the rest is room for an engine that reuses pages early.
DESTINATIONS_OVER_POOL = 4
DESTINATIONS_SLACK = 65_536


class ReceiverSide(SideBase[ReceiverRoom]):
    """Every receiver room of this daemon."""

    role = "decode"

    def __init__(self, ctx: RoomContext) -> None:
        super().__init__(ctx)
        self._by_transfer: dict[int, ReceiverRoom] = {}
        self.paths: Counter[TransferPath] = Counter()  # rooms started, by path
        self._fencing: set[str] = set()  # peers whose receive session is being revoked
        self._released: OrderedDict[int, None] = OrderedDict()  # recently released transfer ids
        #: Destination indices of each pool's unreleased rooms, together (bounded: DESTINATIONS_OVER_POOL).
        self._indices_held: Counter[int] = Counter()
        self._parsed: dict[int, tuple[wp.EngineInfo, list[PoolLayout]]] = {}  # see _layouts
        self.give_ups = GiveUpNotices(ctx, self._layouts)
        self.staged_path = StagedReceiver(ctx, self)

    def handlers(self) -> dict[type, object]:
        """Peer messages this side handles (the daemon routes them here)."""
        return {wp.TransferStatus: self.on_status, wp.AbortAck: self.on_abort_ack,
                wp.ChunkWritten: self.on_chunk_written}

    def start(self, pool: LocalPool, msg: we.RecvRoom) -> None:
        key = (pool.pool_id, msg.room)
        if key in self.rooms:
            raise RoomError(f"room {msg.room} is still in flight on this pool (state "
                            f"{self.rooms[key].machine.state.value}); wait for its release")
        self.rooms.check_room_for(pool, msg.room)
        c = self.ctx.config
        capacity = pool.layout.num_tokens if msg.enable_hisparse else pool.layout.num_pages
        if len(msg.pages) > capacity:
            # Every destination page (HiSparse: token slot) of a room is its own: more of them than
            # the pool has is a bug, and the room keeps its indices (and sends them to every
            # sender) until it ends: up to a frame's worth a room, times the pool's rooms (memory).
            raise RoomError(f"room {msg.room}: {len(msg.pages)} destination "
                            f"{'tokens' if msg.enable_hisparse else 'pages'}, more than the {capacity} of "
                            "its pool")
        held = self._indices_held[pool.pool_id]
        limit = DESTINATIONS_OVER_POOL * capacity + DESTINATIONS_SLACK
        if held + len(msg.pages) > limit:
            # Each room keeps its indices until it is released: bounded one by one only, rooms
            # each naming the whole pool made a tiny pool of many pages cost pages x rooms x 8 bytes.
            raise TooManyRooms(f"room {msg.room}: {len(msg.pages)} destination "
                               f"{'tokens' if msg.enable_hisparse else 'pages'}, but the pool's rooms not yet "
                               f"released name {held} (at most {limit}: {DESTINATIONS_OVER_POOL} x its "
                               f"{capacity} + {DESTINATIONS_SLACK}); wait for their release")
        check_distinct(msg.pages, f"room {msg.room}: destination {'tokens' if msg.enable_hisparse else 'pages'}",
                       capacity)
        if len(msg.pages) * 8 + 4096 > c.peer_max_message_bytes:
            # The indices ride in every TransferRequest: a peer message they do not fit is dropped unseen.
            raise RoomError(f"room {msg.room}: {len(msg.pages)} destination indices do not fit a request to "
                            f"the prefill side (peer.max_message_bytes {c.peer_max_message_bytes})")
        # An engine's timeout may shorten the room's wait, never lengthen it past the configured
        # maximum (inf, nan, 0 or negative: the configured value).
        waiting = min(msg.timeout_s, c.waiting_timeout_s) if 0 < msg.timeout_s < math.inf else c.waiting_timeout_s
        deadlines = Deadlines(min(c.bootstrap_timeout_s, waiting), waiting, c.transfer_timeout_s, c.room_timeout_s)
        layout = pool.layout
        per_index = layout.token_bytes if msg.enable_hisparse else layout.page_bytes
        rr = ReceiverRoom(pool, msg.room, secrets.randbits(63), RoomMachine(deadlines, self.ctx.now()),
                          msg.pages, msg.bootstrap_addr, msg.prefill_engine_id, msg.enable_hisparse,
                          bytes_total=len(msg.pages) * per_index * layout.num_buffers,
                          path=TransferPath.HISPARSE if msg.enable_hisparse else TransferPath.DIRECT)
        self.rooms[key] = rr
        self._indices_held[pool.pool_id] += len(msg.pages)
        self._by_transfer[rr.transfer_id] = rr
        self.ctx.room_changed(self.role, None, rr.machine.state, room=rr.room, pool=pool.key)
        if not self._bootstrap_now(rr):
            rr.tasks.append(self.ctx.spawn(self._bootstrap(rr), f"bootstrap-{rr.room}"))

    def _bootstrap_now(self, rr: ReceiverRoom) -> bool:
        """Bootstrap from what the directory already knows (the engine's topology, the pool
        announced to every sender daemon): no task and no wait, the common case at engine rates
        (issue 15). False: something must be asked first (:meth:`_bootstrap`)."""
        bootstrap = self.ctx.bootstrap
        info = bootstrap.engine_info_now(rr.bootstrap_addr, rr.prefill_engine_id)
        if info is None:
            return False
        self.give_ups.flush(rr.bootstrap_addr, rr.prefill_engine_id, info)
        try:
            layouts, mapping = self._link_senders(rr, info)
            answers = [bootstrap.pool_accepted_now(daemon, rr.pool, rr.prefill_engine_id)
                       for daemon in sorted(rr.peers())]
            if any(a is None for a in answers):
                rr.senders.clear()
                rr.tracker = None
                return False
            self._choose_staging(rr, layouts, mapping, [a for a in answers if a is not None])
        except Exception as exc:  # noqa: BLE001 - sorted by _bootstrap_failed, which re-raises a bug
            self._bootstrap_failed(rr, exc)
            return True
        self._request(rr)
        return True

    async def _bootstrap(self, rr: ReceiverRoom) -> None:
        try:
            info = await self.ctx.bootstrap.engine_info(rr.bootstrap_addr, rr.prefill_engine_id,
                                                        rr.machine.deadline)
            self.give_ups.flush(rr.bootstrap_addr, rr.prefill_engine_id, info)
            layouts, mapping = self._link_senders(rr, info)
            answers = [await self.ctx.bootstrap.announce_pool(daemon, rr.pool, rr.prefill_engine_id,
                                                              rr.machine.deadline) for daemon in sorted(rr.peers())]
            self._choose_staging(rr, layouts, mapping, answers)
        except Exception as exc:  # noqa: BLE001 - sorted by _bootstrap_failed, which re-raises a bug
            self._bootstrap_failed(rr, exc)
            return
        self._request(rr)

    def _send_request(self, rr: ReceiverRoom, link: SenderLink) -> None:
        st = rr.staged
        staged = st is not None and not link.dummy
        self.ctx.send_peer(link.daemon, wp.TransferRequest(
            room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key,
            prefill_engine_id=rr.prefill_engine_id, sender_rank=link.rank,
            dst_indices=np.empty(0, np.int64) if link.dummy else rr.dst_indices,
            dummy=link.dummy, deadline_s=rr.machine.deadlines.waiting_for_input,
            enable_hisparse=rr.hisparse,
            chunk_tokens=st.ledger.geometry.chunk_tokens if st is not None and staged else 0,
            writer=st.ledger.writer_index(link.rank) if st is not None and staged else 0,
            writers=len(st.writers) if st is not None and staged else 0, confirms=True,
            inline_max_bytes=0 if staged else rr.inline_max_bytes))

    def _layouts(self, info: wp.EngineInfo) -> list[PoolLayout]:
        """The prefill ranks' layouts, parsed once per directory answer (not once per room)."""
        cached = self._parsed.get(id(info))
        if cached is not None and cached[0] is info:
            return cached[1]
        layouts = [PoolLayout.from_dict(x) for x in info.layouts]
        if len(self._parsed) >= 256:
            self._parsed.clear()
        self._parsed[id(info)] = (info, layouts)  # the answer is kept: its id cannot be reused meanwhile
        return layouts

    def _link_senders(self, rr: ReceiverRoom, info: wp.EngineInfo) -> tuple[list[PoolLayout], TpMapping]:
        """The sender ranks this room hears from, and what each owes it."""
        layouts = self._layouts(info)
        local = rr.pool.layout
        check_compatible(layouts[0], local)
        if rr.hisparse != local.hisparse:
            raise PlanError("enable_hisparse needs a HiSparse host pool (page size 1) on the decode "
                            "side" if rr.hisparse else "a HiSparse pool receives with enable_hisparse")
        mapping = map_heads(local.total_kv_heads, info.tp_size, local.tp_size)
        required = mapping.required_senders(local.tp_rank)
        tokens = len(rr.dst_indices) * (1 if rr.hisparse else local.page_size)
        for s in mapping.notified_senders(local.tp_rank):
            slices = mapping.slices_between(s, local.tp_rank)
            heads = sum(sl.num_heads for sl in slices)
            ranges = None if heads == local.local_heads else tuple(
                (sl.dst_head_offset * local.head_bytes, (sl.dst_head_offset + sl.num_heads) * local.head_bytes)
                for sl in slices)
            rr.senders[s] = SenderLink(s, info.daemons[s], dummy=s not in required,
                                       bytes_owed=tokens * local.num_buffers * heads * local.head_bytes,
                                       row_ranges=ranges)
        rr.tracker = CompletionTracker(required)
        return layouts, mapping

    def _choose_staging(self, rr: ReceiverRoom, layouts: list[PoolLayout], mapping: TpMapping,
                        answers: list[PoolAccepted]) -> None:
        if answers and all(a.one_pass for a in answers):
            # Every sender is on this machine, GPU to GPU: it writes its head slice straight into
            # our pool (one kernel, one pass), which beats gather + copy + scatter (three).
            return
        # Same TP is staged only for a long fragmented room, and not over RDMA: its per-op cost
        # is small enough to write the runs (TCP's, and the in-process transport's, are not).
        c = self.ctx.config
        run_bytes = 0 if self.ctx.transport.protocol == "rdma" else c.staging_same_tp_run_bytes
        if all(a.staging for a in answers) and not staging_applies(
                layouts[0], rr.pool.layout, hisparse=rr.hisparse, dst_pages=rr.dst_indices,
                run_bytes=run_bytes, min_bytes=c.staging_same_tp_min_bytes):
            rings = [a.send_ring_bytes for a in answers if a.send_ring_bytes > 0]
            rr.staged = self.staged_path.plan(rr, mapping, min(rings) if rings else 0)

    def _bootstrap_failed(self, rr: ReceiverRoom, exc: Exception) -> None:
        """A bootstrap that cannot go on fails its room, with the reason and a counter by kind."""
        if isinstance(exc, LayoutError | PlanError):
            self.ctx.count_error("layout")
            self.fail(rr, str(exc))
        elif isinstance(exc, TimeoutError | ConnectionError):
            self.fail(rr, str(exc) or "prefill bootstrap timed out")
        elif isinstance(exc, IndexError | KeyError | TypeError | ValueError):  # a topology that does not add up
            self.ctx.count_error("bad_peer_message")
            self.fail(rr, f"prefill engine {rr.prefill_engine_id!r}: unusable topology from "
                          f"{rr.bootstrap_addr}: {type(exc).__name__}: {exc}")
        else:
            raise exc

    def _request(self, rr: ReceiverRoom) -> None:
        """Ask every sender rank for the room: the path is decided, the room is bootstrapped."""
        if rr.machine.state.final:
            return
        rr.path = TransferPath.HISPARSE if rr.hisparse else TransferPath.STAGED if rr.staged else TransferPath.DIRECT
        st = rr.staged
        # Host pages this daemon can copy into itself: tiny rooms come inline (kvd.core.inline).
        rr.inline_max_bytes = self.ctx.config.inline_limit if rr.pool.layout.memory_kind == "host" else 0
        for link in rr.senders.values():
            self._send_request(rr, link)
        rr.requested = True
        self.transition(rr, RoomInput.BOOTSTRAPPED)
        self.paths[rr.path] += 1
        if st is not None:
            rr.tasks.append(self.ctx.spawn(self.staged_path.grant_chunks(rr, st), f"grants-{rr.room}"))

    async def _ask_again(self, rr: ReceiverRoom, link: SenderLink) -> None:
        """Announce the room's pool to ``link``'s daemon again, then repeat that sender's request
        (and, staged, the grants it was sent): the room goes on as if the first had been heard."""
        bootstrap = self.ctx.bootstrap
        bootstrap.forget_announce(link.daemon, rr.pool.key)
        try:
            await bootstrap.announce_pool(link.daemon, rr.pool, rr.prefill_engine_id, rr.machine.deadline)
        except Exception as exc:  # noqa: BLE001 - sorted by _bootstrap_failed, which re-raises a bug
            self._bootstrap_failed(rr, exc)
            return
        if rr.machine.state.final:
            return
        self._send_request(rr, link)
        st = rr.staged
        if st is not None and not link.dummy:
            for chunk, offset in sorted(st.ledger.granted.items()):
                if chunk not in st.ledger.scattered:
                    self.ctx.send_peer(link.daemon, wp.StagingGrant(
                        room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key,
                        sender_rank=link.rank, chunk=chunk, offset=offset))

    def maybe_complete(self, rr: ReceiverRoom) -> None:
        if rr.machine.state.final:
            self.maybe_release(rr)  # a failed room's last writer just reported: no wait for a tick
            return
        if rr.tracker is None or not rr.tracker.done:
            return
        if rr.staged is not None and not rr.staged.ledger.done:
            return  # every sender finished; the last scatters are still running
        self.transition(rr, RoomInput.COMPLETED)
        self.ctx.observe_room(self.ctx.now() - rr.machine.created_at, rr.bytes_done)
        self._send_outcomes(rr, ok=True, reason="")
        self.maybe_release(rr)

    def _send_outcomes(self, rr: ReceiverRoom, *, ok: bool, reason: str) -> None:
        """The receiver's verdict to every sender rank: a prefill engine hears success only from here."""
        for link in rr.senders.values():
            self.ctx.send_peer(link.daemon, wp.RoomOutcome(room=rr.room, transfer_id=rr.transfer_id,
                                                           pool_key=rr.pool.key, sender_rank=link.rank, ok=ok,
                                                           reason=reason))

    # --- peer messages ------------------------------------------------------------------
    def lookup(self, transfer_id: int, pool_key: str, room: int) -> ReceiverRoom | None:
        rr = self._by_transfer.get(transfer_id)
        if rr is None or rr.pool.key != pool_key or rr.room != room:
            # A late message for an ended room never touches a new one. One for a room released
            # moments ago is expected (a replica sender's report after the room completed, a
            # status racing an abort); only one for a transfer never seen here is counted.
            if transfer_id not in self._released:
                self.ctx.count_error("stale_message")
            return None
        return rr

    def on_status(self, msg: wp.TransferStatus) -> None:
        rr = self.lookup(msg.transfer_id, msg.pool_key, msg.room)
        if rr is None:
            return
        link = rr.senders.get(msg.sender_rank)
        if link is None or link.daemon != msg.src:
            self.ctx.count_error("bad_peer_message")
            self.fail(rr, f"status from unexpected sender rank {msg.sender_rank} at {msg.src}")
            return
        if link.final:
            self.ctx.count_error("bad_peer_message")
            self.fail(rr, f"sender rank {msg.sender_rank} reported twice")
            return
        if msg.inline_ops or msg.inline_data:
            try:
                self._land_inline(rr, link, msg)
            except Exception as exc:  # noqa: BLE001 - a peer's bytes: whatever they break fails the room
                self.ctx.count_error("bad_peer_message")
                self.fail(rr, f"sender rank {msg.sender_rank}: {exc if isinstance(exc, PlanError) else repr(exc)}")
                return
        if msg.ok and msg.inline_total >= 0 and msg.inline_total != link.inline_bytes \
                and not rr.machine.state.final:
            # A status with inline bytes never arrived: those rows are unwritten, so the room
            # cannot succeed (its bytes_written counts them all the same).
            self.ctx.count_error("lost_status")
            self.fail(rr, f"sender rank {msg.sender_rank} sent {msg.inline_total} inline bytes, "
                          f"{link.inline_bytes} arrived (a status was lost)")
            return
        # Every path and a dummy too (it owes nothing): a peer's number must not outgrow what the
        # room is owed (a room's bytes_done past 2**64 cannot even be encoded for its engine).
        owed = 0 if link.dummy else link.bytes_owed
        if msg.bytes_written > owed:
            self.ctx.count_error("bad_peer_message")
            self.fail(rr, f"sender rank {msg.sender_rank} reported {msg.bytes_written} bytes written, more "
                          f"than the {owed} it owes")
            return
        grew = msg.bytes_written > link.bytes_written
        link.bytes_written = max(link.bytes_written, msg.bytes_written)
        if not msg.final:
            if grew:  # only new bytes restart the deadline: a status that moves nothing is no progress
                link.progress_statuses += 1
                if link.progress_statuses > len(rr.dst_indices) + STATUS_SLACK:
                    self.ctx.count_error("status_flood")
                    self.fail(rr, f"sender rank {msg.sender_rank} sent {link.progress_statuses} progress "
                                  f"statuses, more than the room's {len(rr.dst_indices)} destination indices "
                                  f"+ {STATUS_SLACK} allow")
                    return
                self.progress(rr)
            return
        if not msg.ok and msg.pool_unknown and not link.asked_again and not msg.unsure \
                and link.bytes_written == 0 and not rr.machine.state.final:
            # Its daemon does not know our pool (it forgot it as idle, or restarted, after we
            # cached its acceptance): announce it again and ask once more; a second refusal fails.
            link.asked_again = True
            self.ctx.count_error("pool_announced_again")
            rr.tasks.append(self.ctx.spawn(self._ask_again(rr, link), f"ask-again-{rr.room}-{link.rank}"))
            return
        link.final = True
        if not msg.ok:
            if msg.unsure:  # first: failing the room releases it at once unless a writer is left
                self._unsure(rr, link)
            self.fail(rr, f"sender rank {msg.sender_rank} failed: {msg.reason}")
            return
        if link.dummy:
            self.maybe_release(rr)
            return
        assert rr.tracker is not None
        try:
            if rr.staged is None and link.bytes_written != link.bytes_owed:
                # Success with bytes missing (a buggy sender) is a failure with the numbers.
                raise RoomError(f"sender rank {msg.sender_rank} reported success after writing "
                                f"{link.bytes_written} of the {link.bytes_owed} bytes it owed")
            rr.tracker.report(msg.sender_rank, True)
            if rr.staged is not None:
                missing = rr.staged.ledger.missing_from(msg.sender_rank)
                if missing:
                    raise StagingError(f"sender rank {msg.sender_rank} finished without writing chunks "
                                       f"{missing[:4]} of {rr.staged.ledger.geometry.num_chunks}")
        except (RoomError, StagingError) as exc:
            self.ctx.count_error("bad_peer_message")
            self.fail(rr, str(exc))
            return
        if msg.aux and not rr.aux:
            rr.aux = msg.aux
        self.maybe_complete(rr)

    def _land_inline(self, rr: ReceiverRoom, link: SenderLink, msg: wp.TransferStatus) -> None:
        """Copy a status's inline bytes into the room's pages, each op checked to fall inside
        the pages (or HiSparse tokens) the engine handed over for this room: a peer names
        addresses, this daemon decides whether they are the room's."""
        if rr.machine.state.final:
            return  # a failed room's pages take no more bytes (released ones are never looked up)
        if not msg.ok or link.dummy or rr.staged is not None:
            raise PlanError("inline bytes on a failed status, a dummy sender or a staged room")
        dst, length = unpack_ops(msg.inline_ops, len(msg.inline_data), rr.inline_max_bytes)
        layout = rr.pool.layout
        stride = layout.token_bytes if rr.hisparse else layout.page_bytes
        check_within_indices(dst, length, rr.pool.buffers, layout.buffer_bytes, stride, rr.dst_indices,
                             f"room {rr.room}",
                             None if link.row_ranges is None else (layout.token_bytes, link.row_ranges))
        link.inline_bytes += len(msg.inline_data)
        if link.inline_bytes > link.bytes_owed:
            raise PlanError(f"{link.inline_bytes} inline bytes, more than the {link.bytes_owed} owed")
        data = np.frombuffer(msg.inline_data, dtype=np.uint8)
        base, offset = data.ctypes.data, 0
        for address, n in zip(dst.tolist(), length.tolist(), strict=True):
            ctypes.memmove(address, base + offset, n)
            offset += n

    def on_chunk_written(self, msg: wp.ChunkWritten) -> None:
        rr = self.lookup(msg.transfer_id, msg.pool_key, msg.room)
        if rr is not None:
            self.staged_path.on_chunk_written(rr, msg)

    def on_abort_ack(self, msg: wp.AbortAck) -> None:
        rr = self._by_transfer.get(msg.transfer_id)
        if rr is None:
            return
        link = rr.senders.get(msg.sender_rank)
        if link is not None and link.daemon == msg.src:
            if not link.aborted:
                # Not an answer to an abort (none was sent): it vouches for nothing, or a sender
                # could acknowledge ahead, while it writes, and have the room's pages released
                # without the fence the moment the room fails.
                self.ctx.count_error("bad_peer_message")
                if msg.unsure:  # a write of it may land: fencing it off is safe whoever asked
                    self._unsure(rr, link)
                return
            link.acked = True
            if msg.unsure:
                self._unsure(rr, link)
            self.maybe_release(rr)

    def _unsure(self, rr: ReceiverRoom, link: SenderLink) -> None:
        """A sender cannot vouch that its failed write will not land: only revoking its session
        can, so the room is released after that (a report is not a fence)."""
        link.unsure = True
        self.fence_peer(link.daemon, f"a failed write to room {rr.room} may still land")

    # --- failure, abort, release --------------------------------------------------------
    def abort_from_engine(self, pool: LocalPool, room: int) -> None:
        rr = self.rooms.get((pool.pool_id, room))
        if rr is None:
            raise RoomError(f"no room {room} in flight on pool {pool.pool_id}")
        self.fail(rr, "aborted by the decode engine")

    def fail(self, rm: ReceiverRoom, reason: str) -> None:
        super().fail(rm, reason)
        self.maybe_release(rm)  # also for a room that had already ended

    def entered(self, rr: ReceiverRoom, state: RoomState) -> None:
        # Final states are pushed (success once, by the release that follows at once); the
        # states in between are a poll's answer, not a push per room (control-plane cost).
        if state is RoomState.FAILED:
            self._tell(rr)

    def after_fail(self, rr: ReceiverRoom, reason: str) -> None:
        rr.failed_at = self.ctx.now()
        self._tell(rr)
        if not rr.requested:  # no sender was asked: no abort to wait for, no verdict to give
            self._give_up(rr, reason)
            return
        for link in rr.senders.values():
            if not link.final and not link.dummy:
                link.aborted = True
                self.ctx.send_peer(link.daemon, wp.AbortTransfer(
                    room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=link.rank,
                    reason=reason))
        self._send_outcomes(rr, ok=False, reason=reason)

    def _give_up(self, rr: ReceiverRoom, reason: str) -> None:
        """Tell the sender ranks of a room that never asked them that it is given up (see
        :mod:`kvd.sides.give_up`)."""
        note = GivenUp(rr.room, rr.transfer_id, rr.pool.key, rr.pool.layout, rr.prefill_engine_id, reason)
        if rr.senders:
            self.give_ups.to_links(note, [(link.rank, link.daemon) for link in rr.senders.values()])
        else:
            self.give_ups.to_engine(rr.bootstrap_addr, note)

    def refused(self, pool: LocalPool, msg: we.RecvRoom, reason: str) -> None:
        """A recv this daemon refused (bad indices, a full pool): the prefill engine's rooms of
        that id wait for a request that never comes; they hear it as a room given up."""
        if (pool.pool_id, msg.room) in self.rooms:
            return  # (a live room of that id is not this refusal's to give up)
        self.give_ups.to_engine(msg.bootstrap_addr, GivenUp(
            msg.room, secrets.randbits(63), pool.key, pool.layout, msg.prefill_engine_id,
            f"the decode engine's recv was refused: {reason}"))

    def _may_still_write(self, rr: ReceiverRoom) -> list[int]:
        """Sender ranks whose writes into this room's pages could still land."""
        if rr.machine.state is RoomState.SUCCESS or not rr.requested:
            return []  # (a room never requested: no sender knows its pages)
        writers = [s.rank for s in rr.senders.values() if s.may_write]
        if rr.staged is not None and rr.staged.scattering:
            writers.append(-1)  # this daemon's own scatter into the pages
        return writers

    # --- the write fence ---------------------------------------------------------------------
    def fence_peer(self, peer: str, reason: str) -> None:
        """Revoke ``peer``'s receive session, then release every room only it could still write.

        Bounded and safe: the room's pages go back to the engine only once the receiving end
        refuses the peer's writes, whatever the peer does later (a stall, a partition that heals)."""
        if peer in self._fencing:
            return
        self._fencing.add(peer)
        self.ctx.spawn(self._fence(peer, reason), f"fence-peer-{peer}")

    async def _fence(self, peer: str, reason: str) -> None:
        # The rooms whose requests went out before the fence began: theirs name the session it
        # closes. A room still bootstrapping announces its pool anew once the revocation is done
        # (the directory forgets the peer's announces first) and writes into the new session: it
        # is not fenced off (closing a session takes ~1 s, and new rooms go on meanwhile).
        requested = {id(rr) for rr in self.rooms.values() if rr.requested}
        try:
            await self.ctx.revoke_peer(peer, reason)
        finally:
            self._fencing.discard(peer)
        for rr in list(self.rooms.values()):
            if id(rr) not in requested:
                self.maybe_release(rr)
                continue
            hit = [link for link in rr.senders.values() if link.daemon == peer and link.may_write]
            for link in hit:
                link.revoked = True
            if hit and not rr.machine.state.final:
                self.fail(rr, f"prefill daemon {peer} was fenced off: {reason}")
            self.maybe_release(rr)

    def maybe_release(self, rr: ReceiverRoom) -> None:
        if rr.released or not rr.machine.state.final:
            return
        if self._may_still_write(rr):
            return
        rr.released = True
        pool_id = rr.pool.pool_id
        self._indices_held[pool_id] -= len(rr.dst_indices)
        if self._indices_held[pool_id] <= 0:
            del self._indices_held[pool_id]
        if self.rooms.get((pool_id, rr.room)) is rr:
            del self.rooms[(rr.pool.pool_id, rr.room)]
        self._by_transfer.pop(rr.transfer_id, None)
        self._released[rr.transfer_id] = None
        while len(self._released) > RELEASED_KEPT:
            self._released.popitem(last=False)
        for task in rr.tasks:
            task.cancel()
        if rr.staged is not None:  # no writer can land any more: the regions go back to the pool
            self.staged_path.release(rr, rr.staged)
        self._tell(rr)

    def _tell(self, rr: ReceiverRoom) -> None:
        self.ctx.tell_engine(rr.pool, room_event(rr, released=rr.released,
                                                 aux=rr.aux if rr.machine.state is RoomState.SUCCESS else b""))

    # --- housekeeping -------------------------------------------------------------------
    def tick(self, rr: ReceiverRoom, now: float) -> None:
        if not rr.machine.state.final:
            return
        self.maybe_release(rr)
        if rr.released or rr.failed_at is None or now - rr.failed_at < self.ctx.config.abort_fence_s:
            return
        # A live sender that has not answered the abort within the fence time is fenced off.
        for peer in sorted({s.daemon for s in rr.senders.values() if s.may_write}):
            self.fence_peer(peer, f"no abort answer for room {rr.room} within {self.ctx.config.abort_fence_s:g} s")

    def uses_peer(self, rr: ReceiverRoom, peer: str) -> bool:
        return peer in rr.peers() or (not rr.senders and peer == rr.bootstrap_addr)

    def peer_dead(self, peer: str, what: str) -> None:
        super().peer_dead(peer, what)
        if any(link.daemon == peer and link.may_write for rr in self.rooms.values() for link in rr.senders.values()):
            self.fence_peer(peer, "stopped answering heartbeats")

    def busy_pools(self) -> set[int]:
        return {rr.pool.pool_id for rr in self.rooms.values()}

    def active_peers(self) -> set[str]:
        out: set[str] = set()
        for rr in self.rooms.values():
            out |= rr.peers() or {rr.bootstrap_addr}
        return out

    def snapshot(self) -> list[dict[str, object]]:
        out = []
        for rr in self.rooms.values():
            tracker, st = rr.tracker, rr.staged
            state = rr.machine.state.value + ("" if not rr.machine.state.final or rr.released else " (unreleased)")
            out.append(self.snapshot_base(rr, ",".join(sorted(rr.peers())) or rr.bootstrap_addr, state) | {
                "chunks_done": len(st.ledger.scattered) if st else 0,
                "chunks_total": st.ledger.geometry.num_chunks if st else 0,
                "senders_required": sorted(tracker.required) if tracker else [],
                "senders_reported": sorted(tracker.reported) if tracker else []})
        return out


__all__ = ["ReceiverSide"]
