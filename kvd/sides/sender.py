"""Prefill side of a room: match engine chunks with decode requests and write them.

A sender room is one (prefill engine, sender rank, room). It collects the per-room
requests of every receiver rank the TP mapping says it serves, and the chunks the
engine reports as chunked prefill produces them; each chunk is planned against
every request and written in one batch per receiver. All writes of a room happen
under the room's lock, so an abort answered after taking the lock is a fence: no
write of that room can still land. The direct writes live in :mod:`kvd.sides.direct_send`,
the staged pipeline in :mod:`kvd.sides.staged_send`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import replace

import structlog

from kvd.core.layout import LayoutError
from kvd.core.planner import (
    PlanError,
)
from kvd.core.recent import Recent
from kvd.core.rooms import (
    Deadlines,
    RoomInput,
    RoomMachine,
    RoomState,
    TooManyRooms,
    TransferPath,
    short_reason,
)
from kvd.mem.pools import LocalPool, RemotePool, check_page_indices
from kvd.sides.context import RoomContext
from kvd.sides.direct_send import DirectSender
from kvd.sides.lifecycle import SideBase, room_event
from kvd.sides.pairing import Pairings
from kvd.sides.records import Chunk, ReceiverRequest, SenderRoom
from kvd.sides.staged_send import StagedSender
from kvd.wire import engine as we
from kvd.wire import peer as wp

log = structlog.get_logger("kvd.sender")


#: Rooms remembered as ended before any receiver asked (see SenderSide._ended_unasked).
ENDED_UNASKED_KEPT = 4096
#: Decode daemons remembered as having given one room up (the ranks of one decode engine may sit
#: on several daemons, each giving the room up to the prefill ranks it shares with the others).
GIVERS_KEPT = 64

class SenderSide(SideBase[SenderRoom]):
    """Every sender room of this daemon, driven by engine chunks and peer requests."""

    role = "prefill"

    def __init__(self, ctx: RoomContext) -> None:
        super().__init__(ctx)
        # (transfer id, sender rank) pairs that ended or were aborted: a late request for one is
        # dropped. Per rank: every sender rank of a room shares the transfer id, and a replica's
        # dummy request may arrive after the real sender has finished.
        # Ended (transfer, sender rank) pairs -> whether a failed write of it may still land.
        self._ended: OrderedDict[tuple[int, int], bool] = OrderedDict()
        self._requests: dict[tuple[int, int], tuple[SenderRoom, ReceiverRequest]] = {}
        #: Requests in flight per decode pool key (the pools no room may forget), kept with
        #: ``_requests``: the directory asks at every announce past peer.max_pools, not a pass over the rooms.
        self.pool_requests: Counter[str] = Counter()
        #: Rooms whose engine was told they ended while a batch of theirs is still in flight
        #: (every receiver gone): out of ``rooms``, so the engine may use the room id again at
        #: once, and kept here, their pool busy, until that batch has ended (:meth:`_finish`).
        self._retiring: dict[int, SenderRoom] = {}
        #: Rooms that ended before any receiver asked, (pool id, room) -> (reason, given up by):
        #: a request that comes after is answered with that at once, not held by a new room until
        #: the receiver's deadline (the engine aborted, or its room timed out, first). "Given up
        #: by" names the decode daemons that gave the room up before the engine started it (one
        #: decode engine's ranks may sit on several, GIVERS_KEPT at most): a request of one of
        #: them after it is a new recv of the id (it sends nothing for a room it gave up, and its
        #: messages come in order), and the room, started by the engine's first chunk or by that
        #: request, fails unless each of them asks within the bootstrap timeout (:meth:`tick`).
        #: Otherwise a new chunk of the id forgets the entry (in use again). Bounded.
        self._ended_unasked: Recent[tuple[int, int], tuple[str, frozenset[str]]] = Recent(ENDED_UNASKED_KEPT)
        #: Rooms the engine started (a chunk came) that ended lately, (pool id, room) -> when: a
        #: give-up that comes after is about that room, which is over, so the engine's next first
        #: chunk of the id is a reissue (or, started already, is the reissue): not failed by it.
        #: Bounded; past it a give-up is taken as it comes.
        self._started_ended: Recent[tuple[int, int], bool] = Recent(ENDED_UNASKED_KEPT)
        self._pairings = Pairings()
        self.staged_path = StagedSender(ctx, self)
        self.direct_path = DirectSender(ctx, self)

    def handlers(self) -> dict[type, object]:
        """Peer messages this side handles (the daemon routes them here)."""
        return {wp.TransferRequest: self.on_request, wp.AbortTransfer: self.on_abort,
                wp.StagingGrant: self.staged_path.on_grant, wp.RoomOutcome: self.on_outcome}

    def _deadlines(self) -> Deadlines:
        c = self.ctx.config
        return Deadlines(c.waiting_timeout_s, c.waiting_timeout_s, c.transfer_timeout_s, c.room_timeout_s)

    def _room(self, pool: LocalPool, room: int) -> SenderRoom:
        sr = self.rooms.get((pool.pool_id, room))
        if sr is None:
            self.rooms.check_room_for(pool, room)
            ended = self._ended_unasked.pop((pool.pool_id, room), self.ctx.now(), self.ctx.config.waiting_timeout_s)
            sr = SenderRoom(pool, room, RoomMachine(self._deadlines(), self.ctx.now()))
            self.rooms[sr.key] = sr
            self.ctx.room_changed(self.role, None, sr.machine.state, room=room, pool=pool.key)
            if ended is not None and ended[1]:  # the receiver gave it up before the engine started it
                self._await_givers(sr, ended[0], ended[1])
        return sr

    def _await_givers(self, sr: SenderRoom, reason: str, givers: frozenset[str]) -> None:
        """``sr`` may be the room ``givers`` gave up: it fails within the bootstrap timeout
        unless each of them asks for it (a new recv of the id) first."""
        sr.given_up = (reason, givers, self.ctx.now() + self.ctx.config.bootstrap_timeout_s)

    def tick(self, sr: SenderRoom, now: float) -> None:
        if sr.given_up is not None and now >= sr.given_up[2]:
            self.fail(sr, sr.given_up[0])  # no new recv of the id came: the room was the one given up

    def expired(self, sr: SenderRoom) -> None:
        if sr.given_up is not None:  # its deadline came before its grace ended: the same verdict
            self.fail(sr, sr.given_up[0])
        else:
            super().expired(sr)

    # --- inputs -------------------------------------------------------------------------
    def on_chunk(self, pool: LocalPool, msg: we.SendChunk) -> None:
        """The engine produced pages of a room (validated by the caller)."""
        limit = self.ctx.config.peer_max_message_bytes // 4  # inline bytes take under another quarter
        if len(msg.aux) > limit:
            # It rides in the final status: a peer message it does not fit is dropped unseen.
            raise PlanError(f"room {msg.room}: {len(msg.aux)} bytes of aux, more than the {limit} a "
                            "status to the decode side may carry (a quarter of peer.max_message_bytes)")
        live = self.rooms.get((pool.pool_id, msg.room))
        if live is None and msg.page_offset > 0:
            raise PlanError(f"room {msg.room} is not in flight (it ended, or its first chunk never "
                            f"came): chunk at page offset {msg.page_offset} dropped")
        if live is not None and msg.page_offset >= 0 and msg.page_offset != live.pages_received:
            raise PlanError(f"room {msg.room}: chunk at page offset {msg.page_offset}, expected "
                            f"{live.pages_received} (a chunk was lost or repeated)")
        received = (live.pages_received if live is not None else 0) + len(msg.pages)
        if received > pool.layout.num_pages:
            # Every page of a room holds other tokens: more pages than the pool has is a bug, and
            # a room collects its chunks until a receiver asks (memory).
            raise PlanError(f"room {msg.room}: {received} pages, more than the {pool.layout.num_pages} of "
                            "its pool")
        sr = self._room(pool, msg.room)
        sr.pages_received += len(msg.pages)
        if sr.machine.state.final:
            raise PlanError(f"room {msg.room} already ended ({sr.machine.state.value})")
        if sr.got_last:
            raise PlanError(f"room {msg.room} already got its last chunk")
        sr.chunks.append(Chunk(msg.pages, msg.is_last, msg.aux))
        sr.more.set()
        sr.got_last = msg.is_last
        sr.src_pages.append(msg.pages)
        sr.src_token_count += len(msg.pages) * pool.layout.page_size
        for _, st in sr.staged():
            st.wake.set()
        self._kick(sr)

    def on_request(self, msg: wp.TransferRequest) -> None:
        """A decode daemon asks this sender rank to write a room."""
        if (msg.transfer_id, msg.sender_rank) in self._ended:
            self.ctx.count_error("stale_message")
            return
        known = self._requests.get((msg.transfer_id, msg.sender_rank))
        if known is not None and known[1].msg.src == msg.src:
            # The same request again (a duplicated message): it started its transfer already;
            # answering it as a second receiver would fail that transfer.
            self.ctx.count_error("duplicate_message")
            return
        if known is not None:  # another daemon's transfer id: one request per id, found in O(1)
            self.ctx.count_error("bad_request")
            self._reply_failed(msg, f"transfer {msg.transfer_id} of sender rank {msg.sender_rank} is another "
                                    "receiver's")
            return
        pool = self.ctx.pools.prefill_pool(msg.prefill_engine_id, msg.sender_rank)
        remote = self.ctx.pools.remote(msg.pool_key)
        if pool is None or remote is None:
            self.ctx.count_error("bad_request")
            self._reply_failed(msg, f"no prefill rank {msg.prefill_engine_id}/{msg.sender_rank} is served "
                                    "here" if pool is None else f"decode pool {msg.pool_key} was never announced",
                               pool_unknown=pool is not None)
            return
        ended = None if (pool.pool_id, msg.room) in self.rooms else self._ended_unasked.get(
            (pool.pool_id, msg.room), self.ctx.now(), self.ctx.config.waiting_timeout_s)
        if ended is not None and msg.src not in ended[1]:
            self._reply_failed(msg, f"the prefill engine's room {msg.room} ended before this request came: "
                                    f"{ended[0] or 'ended'}")
            return
        # Validate against the room without creating it: a refused request (a buggy or hostile
        # receiver) costs only itself, never the room other receivers share.
        sr = self.rooms.get((pool.pool_id, msg.room)) or SenderRoom(
            pool, msg.room, RoomMachine(self._deadlines(), self.ctx.now()))
        rkey = (msg.pool_key, remote.layout.tp_rank)
        try:
            req = self._validate_request(sr, msg, remote)
            if rkey in sr.requests:
                raise PlanError(f"receiver {rkey} asked twice for room {msg.room}")
            if sr.expected is not None and len(sr.requests) >= sr.expected:
                raise PlanError(f"room {msg.room} already has its {sr.expected} receivers")
            self.rooms.check_room_for(pool, msg.room)  # a peer opening rooms nobody sends: bounded too
        except (PlanError, LayoutError, TooManyRooms) as exc:
            self.ctx.count_error("bad_request")
            self._reply_failed(msg, str(exc))
            return
        if sr.key not in self.rooms:
            self.rooms[sr.key] = sr
            self.ctx.room_changed(self.role, None, sr.machine.state, room=sr.room, pool=pool.key)
            if ended is not None:  # a new recv of an id this daemon gave up: the others' still may come
                self._ended_unasked.pop(sr.key, self.ctx.now(), self.ctx.config.waiting_timeout_s)
                self._await_givers(sr, ended[0], ended[1])
        sr.requests[rkey] = req
        if sr.given_up is not None and msg.src in sr.given_up[1]:
            # A new recv of the id by a daemon that gave the old one up.
            rest = sr.given_up[1] - {msg.src}
            sr.given_up = (sr.given_up[0], rest, sr.given_up[2]) if rest else None
        if 0 < msg.deadline_s < sr.machine.deadlines.waiting_for_input:
            # The prefill room waits for its engine no longer than the receiver waits for it.
            sr.machine.deadlines = replace(sr.machine.deadlines, waiting_for_input=msg.deadline_s)
        self._requests[(msg.transfer_id, msg.sender_rank)] = (sr, req)
        self.pool_requests[msg.pool_key] += 1
        if not req.dummy:
            sr.path = TransferPath.of_request(hisparse=msg.enable_hisparse, chunk_tokens=msg.chunk_tokens)
        if req.staged is not None:
            self.staged_path.track(sr, req)
        if sr.machine.state.final:
            self._reply_failed(msg, sr.machine.reason or "room already ended")
            return
        self._kick(sr)

    def _validate_request(self, sr: SenderRoom, msg: wp.TransferRequest,
                          remote: RemotePool) -> ReceiverRequest:
        local = sr.pool.layout
        if msg.enable_hisparse != remote.layout.hisparse:
            raise PlanError("enable_hisparse does not match the receiver pool "
                            f"(request {msg.enable_hisparse}, pool hisparse {remote.layout.hisparse})")
        pairing = self._pairings.of(sr.pool, remote)
        slices, expected = pairing.slices, pairing.receivers
        if bool(slices) == msg.dummy:
            raise PlanError(
                f"receiver rank {remote.layout.tp_rank} asks for "
                f"{'nothing' if msg.dummy else 'heads'} but sender rank {local.tp_rank} holds "
                f"{'heads it needs' if slices else 'none of its heads'}")
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
            staged = self.staged_path.validate(sr, msg, remote, slices)
        return ReceiverRequest(msg, remote, slices, staged=staged, planners=pairing.planners)

    def on_abort(self, msg: wp.AbortTransfer) -> None:
        self._remember_ended(msg.transfer_id, msg.sender_rank)
        if (msg.transfer_id, msg.sender_rank) not in self._requests:
            # Nothing of it is in flight, so no fence to wait for: answered here, in the order it
            # came (a give-up handled in a task of its own ran after the request that followed it
            # in the same batch, a reissue of the id, and failed that).
            self._abort_unasked(msg)
            return
        self.ctx.spawn(self._abort(msg), f"abort-{msg.room}-{msg.sender_rank}")

    def request_srcs(self, transfer_id: int, sender_rank: int) -> list[str]:
        """Who asked for a transfer in flight (at most one daemon; a lookup, not a scan of the rooms)."""
        found = self._requests.get((transfer_id, sender_rank))
        return [] if found is None else [found[1].msg.src]

    async def _abort(self, msg: wp.AbortTransfer) -> None:
        # A lookup, not a scan of every room: a peer's abort costs the same however many rooms
        # are in flight.
        found = self._requests.get((msg.transfer_id, msg.sender_rank))
        if found:
            sr, req = found
            req.aborted = True
            if req.staged is not None:
                req.staged.wake.set()
            async with sr.lock, req.lock:  # fence: the batch in flight (if any) has finished
                pass
            # One receiver's abort ends what this room owes it; the room fails once no receiver
            # it writes to is left (another receiver of the room goes on).
            if all(r.aborted or r.dummy for r in sr.requests.values()):
                self.fail(sr, f"aborted by receiver: {msg.reason or 'abort'}")
            else:
                self.maybe_complete(sr)
        else:
            self._abort_unasked(msg)
            return
        self.ctx.send_peer(msg.src, wp.AbortAck(room=msg.room, transfer_id=msg.transfer_id,
                                                pool_key=msg.pool_key, sender_rank=msg.sender_rank,
                                                unsure=req.unsure))

    def _abort_unasked(self, msg: wp.AbortTransfer) -> None:
        """An abort of a transfer not in flight here (ended, or never asked: a give-up)."""
        if msg.prefill_engine_id:
            self._given_up(msg)
        self.ctx.send_peer(msg.src, wp.AbortAck(room=msg.room, transfer_id=msg.transfer_id,
                                                pool_key=msg.pool_key, sender_rank=msg.sender_rank,
                                                unsure=self._ended.get((msg.transfer_id, msg.sender_rank), False)))

    def _given_up(self, msg: wp.AbortTransfer) -> None:
        """A receiver gave the room up before it asked: fail the engine's room (unless another
        daemon asked for it), or, not started yet, fail it when the engine starts it."""
        pool = self.ctx.pools.prefill_pool(msg.prefill_engine_id, msg.sender_rank)
        if pool is None:
            return
        # Cut: it is kept (ENDED_UNASKED_KEPT rooms) and sent back whole to a late request.
        reason = short_reason(f"the decode side gave room {msg.room} up before asking for it: "
                              f"{msg.reason or 'aborted'}")
        if self._started_ended.get((pool.pool_id, msg.room), self.ctx.now(), self.ctx.config.waiting_timeout_s):
            return  # late: the room it gave up ended here already (the id may be in use again)
        sr = self.rooms.get((pool.pool_id, msg.room))
        if sr is None:
            kept = self._ended_unasked.get((pool.pool_id, msg.room), self.ctx.now(), self.ctx.config.waiting_timeout_s)
            if kept is not None and kept[1]:  # another daemon gave it up too (one engine, ranks on both)
                reason, givers = kept[0], (kept[1] | {msg.src}) if len(kept[1]) < GIVERS_KEPT else kept[1]
            else:
                givers = frozenset({msg.src})
            self._ended_unasked.put((pool.pool_id, msg.room), (reason, givers), self.ctx.now())
        elif sr.given_up is not None and not any(r.msg.src == msg.src for r in sr.requests.values()):
            # Started after another daemon gave the id up, and given up by this one too: the
            # same old room, seen from another daemon's ranks; it waits for their new recv as well.
            if len(sr.given_up[1]) < GIVERS_KEPT:
                sr.given_up = (sr.given_up[0], sr.given_up[1] | {msg.src}, sr.given_up[2])
        elif not sr.machine.state.final and all(r.msg.src == msg.src for r in sr.requests.values()):
            self.fail(sr, reason)

    def on_outcome(self, msg: wp.RoomOutcome) -> None:
        """The receiver's verdict: success completes a room whose writes are done; failure fails it."""
        found = self._requests.get((msg.transfer_id, msg.sender_rank))
        if found is None or found[1].msg.src != msg.src or found[1].msg.pool_key != msg.pool_key:
            self.ctx.count_error("stale_message")
            return
        sr, req = found
        req.outcome = msg.ok
        if not msg.ok:
            req.aborted = True  # the receiver has given up on this room: nothing more to it
            self.fail(sr, f"receiver failed the room: {msg.reason or 'failed'}")
        else:
            self.maybe_complete(sr)

    def abort_from_engine(self, pool: LocalPool, room: int, reason: str) -> None:
        sr = self.rooms.get((pool.pool_id, room))
        if sr is not None:
            self.fail(sr, reason)

    # --- work ---------------------------------------------------------------------------
    def _kick(self, sr: SenderRoom) -> None:
        if sr.expected is not None and len(sr.requests) >= sr.expected \
                and sr.machine.state is RoomState.BOOTSTRAPPING:
            self.transition(sr, RoomInput.BOOTSTRAPPED)
        if sr.machine.is_live:
            # One drain task per room: chunks that arrive before it runs (a burst the engine sent
            # without waiting) are planned by it as one batch, not by one task each.
            if sr.chunks and not sr.draining and not self.direct_path.drain_now(sr):
                sr.draining = True
                self.ctx.spawn(self.direct_path.drain(sr), f"drain-{sr.room}")
            self.staged_path.start(sr)

    # --- endings ------------------------------------------------------------------------
    def maybe_complete(self, sr: SenderRoom) -> None:
        """Report each receiver once every write is done; complete once every receiver that
        confirms has said success (an older receiver's request does not wait)."""
        if sr.machine.state.final or not sr.direct_done:
            return
        if not all(r.staged is None or r.staged.done or r.aborted for r in sr.requests.values()):
            return
        for req in sr.requests.values():
            if not req.aborted and not req.reported:
                req.reported = True
                self.ctx.send_peer(req.msg.src, self.status_message(req, ok=True, final=True, aux=sr.aux))
        if any(r.aborted for r in sr.requests.values()):
            # A receiver aborts only a room that failed on its side (its failed outcome may come
            # after the abort, or never): the engine must not hear success for it.
            self.fail(sr, "a receiver of the room aborted it")
            return
        if any(r.msg.confirms and r.outcome is None and not r.aborted for r in sr.requests.values()):
            return  # written; the receivers' verdicts decide what the engine hears
        self.transition(sr, RoomInput.COMPLETED)
        self._finish(sr)

    def after_fail(self, sr: SenderRoom, reason: str) -> None:
        if sr.requests and all(r.aborted for r in sr.requests.values()):
            # Every receiver is gone (dead, fenced us off, or gave up): none waits on our fence,
            # so the engine hears now, not when a batch stuck on a dead link times out. The room
            # stays (its pool busy, never unmapped) until that batch has ended, but no longer
            # under its id: the engine heard the room ended, so a room it starts with the same
            # id (a retry after a peer's restart or a healed partition) is a new room, not a
            # chunk or request refused by this one.
            self._tell_engine(sr)
            self._retire(sr)
        # Tell receivers only once no batch of this room is in flight.
        self.ctx.spawn(self._fail_after_fence(sr, reason), f"fence-{sr.room}")

    async def _fail_after_fence(self, sr: SenderRoom, reason: str) -> None:
        for req, st in sr.staged():
            st.wake.set()
            await st.not_gathering.wait()  # the pool may be unmapped after this
            async with req.lock:
                pass
        async with sr.lock:
            for req in sr.requests.values():
                if not req.reported and not req.aborted:
                    req.reported = True
                    self.ctx.send_peer(req.msg.src, self.status_message(req, ok=False, final=True, reason=reason))
            self._finish(sr)

    def _remember_unasked(self, pool_id: int, room: int, reason: str) -> None:
        self._ended_unasked.put((pool_id, room), (reason, frozenset()), self.ctx.now())

    def _remember_started_ended(self, sr: SenderRoom) -> None:
        """``sr`` leaves the room table: remember its id if the engine had started it."""
        if sr.src_pages:
            self._started_ended.put(sr.key, True, self.ctx.now())

    def _finish(self, sr: SenderRoom) -> None:
        if not sr.requests and sr.machine.state.final:
            self._remember_unasked(sr.pool.pool_id, sr.room, sr.machine.reason)
        for req in sr.requests.values():
            self._remember_ended(req.msg.transfer_id, req.msg.sender_rank, unsure=req.unsure)
            self.staged_path.untrack(req)
            if self._requests.get((req.msg.transfer_id, req.msg.sender_rank), (None, None))[1] is req:
                del self._requests[(req.msg.transfer_id, req.msg.sender_rank)]
                self.pool_requests[req.msg.pool_key] -= 1
                if self.pool_requests[req.msg.pool_key] <= 0:
                    del self.pool_requests[req.msg.pool_key]
        if self.rooms.get(sr.key) is sr:
            del self.rooms[sr.key]
            self._remember_started_ended(sr)
        self._retiring.pop(id(sr), None)
        self._tell_engine(sr)

    def _retire(self, sr: SenderRoom) -> None:
        """Take an ended room out of ``rooms`` (its id is free) until :meth:`_finish`."""
        if self.rooms.get(sr.key) is sr:
            del self.rooms[sr.key]
            self._remember_started_ended(sr)
            self._retiring[id(sr)] = sr

    def _tell_engine(self, sr: SenderRoom) -> None:
        if not sr.engine_told:
            sr.engine_told = True
            self.ctx.tell_engine(sr.pool, room_event(sr, released=True))

    def status_message(self, req: ReceiverRequest, *, ok: bool, final: bool, reason: str = "",
                aux: bytes = b"") -> wp.TransferStatus:
        m = req.msg
        inline_ops, inline_data = (req.inline_ops, req.inline_data) if ok else (b"", b"")
        req.inline_ops = req.inline_data = b""
        return wp.TransferStatus(room=m.room, transfer_id=m.transfer_id, pool_key=m.pool_key,
                                 sender_rank=m.sender_rank, ok=ok, reason=reason, aux=aux,
                                 bytes_written=req.bytes_written, final=final, unsure=req.unsure,
                                 inline_ops=inline_ops, inline_data=inline_data,
                                 inline_total=req.inline_total if ok else -1)

    def _reply_failed(self, msg: wp.TransferRequest, reason: str, *, pool_unknown: bool = False) -> None:
        self.ctx.send_peer(msg.src, wp.TransferStatus(
            room=msg.room, transfer_id=msg.transfer_id, pool_key=msg.pool_key,
            sender_rank=msg.sender_rank, ok=False, reason=reason, final=True, pool_unknown=pool_unknown))

    def _remember_ended(self, transfer_id: int, sender_rank: int, *, unsure: bool = False) -> None:
        """Remember an ended transfer, and whether its failed write may still land: an abort
        that arrives after the room ended must still hear "unsure" (else the receiver releases
        pages a stalled write can land in)."""
        key = (transfer_id, sender_rank)
        self._ended[key] = self._ended.get(key, False) or unsure
        while len(self._ended) > 100_000:
            self._ended.popitem(last=False)

    # --- housekeeping -------------------------------------------------------------------
    def uses_peer(self, sr: SenderRoom, peer: str) -> bool:
        return any(r.msg.src == peer for r in sr.requests.values())

    def peer_lost(self, sr: SenderRoom, peer: str, now: float) -> None:
        for r in sr.requests.values():
            if r.msg.src == peer:
                r.aborted = True

    def active_peers(self) -> set[str]:
        return {r.msg.src for sr in self.rooms.values() for r in sr.requests.values()}

    def busy_pools(self) -> set[int]:
        return {sr.pool.pool_id for sr in (*self.rooms.values(), *self._retiring.values())}

    def snapshot(self) -> list[dict[str, object]]:
        out = []
        for sr in (*self.rooms.values(), *self._retiring.values()):
            peers = sorted({r.msg.src for r in sr.requests.values()})
            out.append(self.snapshot_base(sr, ",".join(peers) or "-", sr.machine.state.value)
                       | {"senders_required": [], "senders_reported": []})
        return out


__all__ = ["SenderSide", "SenderRoom", "ReceiverRequest", "Chunk"]
