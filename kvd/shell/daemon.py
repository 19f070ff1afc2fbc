"""The daemon: builds the parts, routes engine requests and peer messages to them, runs the loop.

``Daemon.serve()`` = bind (Unix socket for engines, ZMQ ROUTER for peers, Mooncake) ->
READY -> run until a signal -> graceful shutdown. Rooms live in the sides
(:mod:`kvd.sides`), pools in :mod:`kvd.shell.pool_registry`, directories and pool
announces in :mod:`kvd.shell.directory`; the daemon is the :class:`~kvd.sides.context.RoomContext`
the sides see and the one owner of every background task. Nothing blocking runs on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import signal
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from kvd import __version__
from kvd.core.config import Config
from kvd.core.layout import LayoutError, PoolLayout
from kvd.core.planner import PlanError, check_token_indices
from kvd.core.rooms import RoomError, RoomState
from kvd.core.staging import StagingError
from kvd.mem.fdpool import ReceivedFd
from kvd.mem.pools import LocalPool
from kvd.obs.metrics import Metrics
from kvd.obs.sdnotify import Watchdog, ready, stopping, watchdog_interval
from kvd.shell.directory import Directory
from kvd.shell.engine_server import EngineServer, RequestError, prepare_socket_path
from kvd.shell.peer_hub import PeerHub
from kvd.shell.pool_registry import PoolRegistry, PreparedPool, close_held_fd
from kvd.shell.status import StatusSources, room_counts, snapshot
from kvd.shell.trust import Trust, trust_gate
from kvd.sides.lifecycle import room_event
from kvd.sides.receiver import ReceiverSide
from kvd.sides.sender import SenderSide
from kvd.sides.tasks import TaskOwner
from kvd.transfer.base import BatchResult, Transport
from kvd.transfer.mooncake import MooncakeTransport
from kvd.transfer.sessions import SessionedTransport
from kvd.wire import engine as we
from kvd.wire.codec import Message

if TYPE_CHECKING:  # torch comes in only once staging is on
    from kvd.mem.stagemem import KernelRunner, StagingPool

log = structlog.get_logger("kvd.daemon")
_stdlog = logging.getLogger("kvd.daemon")

#: Final events kept per engine connection for polls after a room ended.
ENDED_ROOMS_KEPT = 4096
#: Aux bytes those events may hold together, per connection (the oldest go first past it).
ENDED_AUX_BYTES = 16 << 20

#: Exit status after a fatal failure (EX_SOFTWARE): non-zero, so systemd restarts kvd.
EXIT_FATAL = 70
#: Seconds without a healthy housekeeping pass after which the watchdog is no longer pinged.
HOUSEKEEPING_STALE_S = 5.0


class Daemon:
    """One per node; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.boot_id = secrets.token_hex(4)
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.errors: Counter[str] = Counter()
        self.tasks = TaskOwner(on_crash=lambda name, exc: self.count_error("task_crash"))
        self._transport: SessionedTransport | None = None
        self.registry = PoolRegistry(config, lambda: self.transport)
        self.pools = self.registry
        self.peers = PeerHub(config, self, self.tasks)
        self.engines = EngineServer(config, self)
        self.trust = Trust(config, self.count_error, self.now)  # keys are loaded in start()
        self.engines.access = self.trust.access
        self.directory = Directory(config, self.registry, self.receive_session, self.send_peer,
                                   self.count_error, self.now)
        self.bootstrap = self.directory
        self.senders = SenderSide(self)
        self.receivers = ReceiverSide(self)
        self._routes: dict[type, Callable[[Any], None]] = {
            **self.directory.handlers(), **self.senders.handlers(), **self.receivers.handlers()}  # type: ignore[dict-item]
        # Per engine connection, the final events of its latest ended rooms (bounded).
        self._ended_rooms: dict[int, OrderedDict[tuple[int, int], we.RoomEvent]] = {}  # by (pool, room)
        self._ended_bytes: dict[int, int] = {}  # aux bytes of each connection's ended events
        self._stop = asyncio.Event()

    # --- the RoomContext the sides see ----------------------------------------------------------
    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise RuntimeError("the transport is not started yet")
        return self._transport

    @property
    def kernels(self) -> KernelRunner:
        return self.registry.kernels

    @property
    def address(self) -> str:
        return self.peers.address

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.metrics.error(kind)

    def observe_batch(self, result: BatchResult) -> None:
        self.metrics.observe_batch(result.nbytes, result.seconds, result.ops)

    def observe_inline(self, nbytes: int) -> None:
        self.metrics.observe_inline(nbytes)

    def observe_room(self, seconds: float, nbytes: int) -> None:
        self.metrics.observe_room(seconds)
        self.metrics.add_received(nbytes)

    def room_changed(self, role: str, before: RoomState | None, after: RoomState, **ctx: Any) -> None:
        # Failures at warning; every other change at debug (thousands of rooms a second at info
        # cost more CPU than the rooms: issue 15), skipped before structlog when debug is off.
        if after is RoomState.FAILED:
            log.warning("room_state", role=role, state=after.value, previous=before.value if before else None, **ctx)
        elif _stdlog.isEnabledFor(logging.DEBUG):
            log.debug("room_state", role=role, state=after.value, previous=before.value if before else None, **ctx)

    def send_peer(self, addr: str, msg: Message) -> None:
        self.peers.send(addr, msg)

    def tell_engine(self, pool: LocalPool, event: we.RoomEvent) -> None:
        self.engines.push(pool.conn_id, event)
        # A poll after the end gets the final state, not "unknown room"; nobody polls for the
        # rooms of an engine that has gone (they end after it did: keeping them would leak).
        if event.released and not pool.closing:
            ended = self._ended_rooms.setdefault(pool.conn_id, OrderedDict())
            before = ended.pop((pool.pool_id, event.room), None)
            kept = self._ended_bytes.get(pool.conn_id, 0) - (len(before.aux) if before else 0) + len(event.aux)
            ended[(pool.pool_id, event.room)] = event
            # Bounded in bytes too: an aux (a peer's, up to a peer message) is kept with its event.
            while len(ended) > ENDED_ROOMS_KEPT or (kept > ENDED_AUX_BYTES and len(ended) > 1):
                kept -= len(ended.popitem(last=False)[1].aux)
            self._ended_bytes[pool.conn_id] = kept

    def staging_pool(self, pool: LocalPool) -> StagingPool | None:
        return self.registry.staging_pool(pool)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro, name)

    async def receive_session(self, peer: str) -> str:
        if self._transport is None:
            raise RuntimeError("the transport is not started yet")
        return await self._transport.receive_session(peer)

    async def revoke_peer(self, peer: str, reason: str) -> None:
        """The write fence: close ``peer``'s receive session; pools are announced anew after."""
        if self._transport is None:
            return
        if self._transport.has_session(peer):
            self.count_error("peer_revoked")
        self.directory.peer_dead(peer)  # its announces named the revoked session
        await self._transport.revoke(peer, reason)

    # --- routing ------------------------------------------------------------------------------
    def on_peer_message(self, msg: Message) -> None:
        """Dispatch one authenticated peer message; a handler error fails one room, never the loop."""
        route = self._routes.get(type(msg))
        if route is None:
            self.count_error("protocol")
            return
        if self.trust.gate is not None and not self.trust.gate.admit(msg):
            return  # a peer speaking for another daemon's engines, pools or transfers
        try:
            route(msg)
        except (LayoutError, PlanError, StagingError, RoomError, ValueError, TypeError, KeyError) as exc:
            # A peer's message that does not make sense (a layout that fails its checks, say): its
            # fault, not a bug here, so a warning and a counter, no traceback.
            self.count_error("bad_peer_message")
            log.warning("peer_message_refused", msg=type(msg).__name__, src=getattr(msg, "src", "?"),
                        error=f"{type(exc).__name__}: {exc}")

    def on_engine_request(self, conn_id: int, msg: Message) -> Message | Awaitable[Message]:
        if self.registry.stopping and isinstance(msg, we.SendChunk | we.RecvRoom):
            raise RequestError("busy", "kvd is shutting down: no new room or chunk is taken", msg.room)
        match msg:
            case we.RegisterPool():
                return self._pool_registered(conn_id, msg)  # awaited by the engine server
            case we.SendChunk():
                pool = self._engine_pool(conn_id, msg.pool_id, "prefill")
                pool.check_pages(msg.pages, f"room {msg.room} source pages")
                self.senders.on_chunk(pool, msg)
                return we.Ok(req_id=msg.req_id)
            case we.RecvRoom():
                pool = self._engine_pool(conn_id, msg.pool_id, "decode")
                if not msg.bootstrap_addr.startswith("tcp://"):
                    raise RequestError("bad_request", f"bootstrap address {msg.bootstrap_addr!r} "
                                                      "must look like tcp://host:port")
                try:
                    if msg.enable_hisparse:
                        check_token_indices(msg.pages, pool.layout, f"room {msg.room} destination tokens")
                    else:
                        pool.check_pages(msg.pages, f"room {msg.room} destination pages")
                    self.receivers.start(pool, msg)
                except Exception as exc:  # refused: its prefill rooms must not wait for it
                    self.receivers.refused(pool, msg, str(exc)[:200])
                    raise
                return we.Ok(req_id=msg.req_id)
            case we.PollRoom():
                return self._poll(conn_id, msg)
            case we.AbortRoom():
                owned = self.registry.local.get(msg.pool_id)
                if owned is None or owned.conn_id != conn_id:
                    raise RequestError("unknown_pool", f"pool {msg.pool_id} is not registered on this connection")
                if owned.layout.role == "decode":
                    self.receivers.abort_from_engine(owned, msg.room)
                else:
                    self.senders.abort_from_engine(owned, msg.room, "aborted by the prefill engine")
                return we.Ok(req_id=msg.req_id)
            case we.StatusRequest():
                return we.StatusReply(req_id=msg.req_id, status=self.trust.access.filter_status(
                    self.snapshot(), conn_id, self._owned_by_uid(conn_id)))
        raise RequestError("protocol", f"unhandled request {type(msg).__name__}")

    def _poll(self, conn_id: int, msg: we.PollRoom) -> we.RoomEvent:
        """A room's state now: the room of that id on the named pool, or (pool_id -1, an older
        client) on any pool of the connection; an ended room's final event while it is kept."""
        if msg.pool_id >= 0:
            owned = self.registry.local.get(msg.pool_id)
            if owned is None or owned.conn_id != conn_id:
                raise RequestError("unknown_pool", f"pool {msg.pool_id} is not registered on this connection")
            key = (msg.pool_id, msg.room)
            rr, sr = self.receivers.rooms.get(key), self.senders.rooms.get(key)
            pool_ids = [msg.pool_id]
        else:
            rr, sr = self.receivers.find(conn_id, msg.room), self.senders.find(conn_id, msg.room)
            pool_ids = [pool.pool_id for pool in self.registry.pools_of(conn_id)]
        if rr is not None:
            return room_event(rr, req_id=msg.req_id, released=rr.released)
        if sr is not None:
            return room_event(sr, req_id=msg.req_id)
        ended_rooms: Mapping[tuple[int, int], we.RoomEvent] = self._ended_rooms.get(conn_id) or {}
        for pool_id in pool_ids:
            ended = ended_rooms.get((pool_id, msg.room))
            if ended is not None:
                return replace(ended, req_id=msg.req_id)
        raise RequestError("unknown_room", f"no room {msg.room} in flight on this connection", msg.room)

    def _engine_pool(self, conn_id: int, pool_id: int, role: str) -> LocalPool:
        pool = self.registry.local.get(pool_id)
        if pool is None or pool.conn_id != conn_id or pool.closing:
            raise RequestError("unknown_pool", f"pool {pool_id} is not registered on this connection")
        if pool.layout.role != role:
            raise RequestError("bad_request", f"pool {pool_id} is a {pool.layout.role} pool; "
                                              f"this call is for {role} pools")
        return pool

    # --- pools ----------------------------------------------------------------------------
    async def _pool_registered(self, conn_id: int, msg: we.RegisterPool) -> Message:
        pool = await self.register_pool(conn_id, msg)
        return we.PoolRegistered(req_id=msg.req_id, pool_id=pool.pool_id)

    async def register_pool(self, conn_id: int, msg: we.RegisterPool) -> LocalPool:
        """Open, check and register an engine's pool; a prefill rank is announced to its directory.

        The memory is opened and registered on the registry's registrar thread (seconds for GPU
        pools), so the loop keeps serving every other engine and peer meanwhile; what the loop
        decided before is checked again after, and an engine gone meanwhile gets nothing."""
        layout = PoolLayout.from_dict(msg.layout)
        self._admit_pool(conn_id, layout)
        # The layout's memory kind decides who copies bytes how (inline writes are plain CPU
        # copies, from and into "host" pools): it is what the memory handed over is, not what
        # the engine's layout says (PoolLayout defaults to "host", CUDA IPC pools included).
        kind = {"fd": "host", "shm": "host", "cuda_ipc": "gpu"}.get(str(msg.memory.get("kind")))
        if kind is not None and kind != layout.memory_kind:
            log.warning("pool_memory_kind_corrected", engine=layout.engine_id, rank=layout.tp_rank,
                        claimed=layout.memory_kind, memory=msg.memory.get("kind"), kind=kind)
            layout = replace(layout, memory_kind=kind)
        if msg.memory.get("kind") == "cuda_ipc" and "torch" not in sys.modules:
            log.warning("torch_import_off_loop", hint="set pools.gpu = true (KVD_POOLS_GPU=1) to import "
                                                      "torch at start-up instead of on this registration")
        memory = self.trust.resolve_memory(conn_id, msg.memory)  # a handed-over fd, never a name
        try:  # a bad descriptor is refused as such first, then a rank already registered
            self.registry.check_new(layout)
            await self._old_mapping_fenced(memory)
        except BaseException:
            close_held_fd(memory)
            raise
        job = self.registry.registrar.submit(self.registry.prepare, layout, memory)
        try:
            prepared = await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # the engine went away (kvd.shell.engine_server)
            if job.cancel():  # still queued: never carried out
                close_held_fd(memory)
            else:  # under way: undone once done
                job.add_done_callback(self._undo_registration)
            raise
        try:
            self._admit_pool(conn_id, layout)  # another registration may have won meanwhile
            self.registry.check_new(layout)
            pool = self.registry.adopt(conn_id, layout, prepared, msg.bootstrap, f"{self.address}#{self.boot_id}")
            pool.uid = self.trust.access.creds(conn_id).uid
        except BaseException:
            self.registry.release_later(prepared.opened)
            raise
        try:  # from here on a refusal must not leave the pool registered
            if layout.role == "prefill":
                self.directory.announce_rank(layout, msg.bootstrap or self.address, pool.key)
            log.info("pool_registered", pool=pool.key, layout=layout.describe(),
                     bytes=layout.pool_bytes, memory=msg.memory.get("kind"))
        except BaseException:
            self.registry.drop(pool)
            raise
        return pool

    async def _old_mapping_fenced(self, memory: Any) -> None:
        """Wait while a closing pool maps the same file (an engine restarted, handing over its
        segment again): its rooms' senders may write through the old mapping until they are
        fenced (an answer to the abort, or their session revoked), and those writes would land in
        the new pool's pages. Bounded by the old rooms' deadlines and the abort fence; an engine
        that leaves meanwhile cancels the wait (kvd.shell.engine_server)."""
        held = memory.get("fd") if isinstance(memory, dict) else None
        identity = held.identity() if isinstance(held, ReceivedFd) else None
        if identity is None:
            return
        waited = False
        while not self.registry.stopping and any(
                p.closing and p.opened.identity == identity for p in self.registry.local.values()):
            if not waited:
                waited = True
                self.count_error("pool_registration_fence_wait")
                log.info("pool_registration_waits_for_fence", reason="a closing pool maps the same memory")
            await asyncio.sleep(0.05)

    def _undo_registration(self, job: concurrent.futures.Future[PreparedPool]) -> None:
        """A registration nobody waits for any more, once done: its memory released (on the registrar)."""
        if job.cancelled() or job.exception() is not None:
            return
        log.info("pool_registration_undone", reason="the engine closed its connection during its registration")
        self.registry.release_later(job.result().opened)

    def _admit_pool(self, conn_id: int, layout: PoolLayout) -> None:
        """RequestError / LayoutError unless this connection may register this rank now."""
        # An engine id is a name the engine picks: while another user's engine holds ranks of it
        # here, a rank of it is not anyone else's to take (the directory would route that
        # engine's rooms, and their ids, to the taker).
        creds = self.trust.access.creds
        uid = creds(conn_id).uid
        limit = self.config.socket_max_pools_per_uid
        held = sum(1 for p in self.registry.local.values() if p.uid == uid)
        if held >= limit:  # closing pools included: they are mapped until reaped
            raise RequestError("busy", f"uid {uid} holds {held} pools (socket.max_pools_per_uid {limit}); "
                                       "close some engine connections first")
        holders = {creds(p.conn_id).uid for p in self.registry.local.values()  # a closing pool's engine is gone
                   if p.layout.engine_id == layout.engine_id and p.layout.role == layout.role and not p.closing}
        if holders - {uid}:
            raise RequestError("forbidden", f"{layout.role} engine {layout.engine_id!r} has ranks registered "
                                            "here by another user")
        if not holders and (refused := self.trust.access.engine_claim_refusal(
                (layout.engine_id, layout.role), uid, self.now())):
            # Mid-restart (no rank registered): the name is still its last user's for a while.
            self.count_error("engine_name_held")
            raise RequestError("forbidden", refused)

    def engine_gone(self, conn_id: int) -> None:
        """An engine went away: fail its rooms; unregister each pool once nothing can write into it."""
        self._ended_rooms.pop(conn_id, None)
        self._ended_bytes.pop(conn_id, None)
        if self.registry.stopping:
            # The stop closes the engine connections after the task owner: no room may start its
            # fence or a pool its reaper now; rooms end with the process and the stop unregisters
            # every pool (peers learn of it by the new incarnation, or their heartbeats).
            return
        pools = self.registry.pools_of(conn_id)
        for pool in pools:
            pool.closing = True
            self.senders.pool_closed(pool)
            self.receivers.pool_closed(pool)
        uid = self.trust.access.creds(conn_id).uid
        for engine in {(p.layout.engine_id, p.layout.role) for p in pools}:
            if not any((p.layout.engine_id, p.layout.role) == engine and not p.closing
                       for p in self.registry.local.values()):
                self.trust.access.engine_left(engine, uid, self.now())  # its name is kept a while
        if pools:
            self.spawn(self._reap_pools(), f"reap-pools-{conn_id}")

    async def _reap_pools(self) -> None:
        while self.registry.reap(self.receivers.busy_pools() | self.senders.busy_pools()):
            await asyncio.sleep(0.2)

    # --- peers ------------------------------------------------------------------------------
    def peer_dead(self, peer: str) -> None:
        self.count_error("peer_dead")
        log.warning("peer_dead", peer=peer)
        self.directory.peer_dead(peer)
        self.senders.peer_dead(peer, "decode daemon")
        self.receivers.peer_dead(peer, "prefill daemon")

    def active_peers(self) -> set[str]:
        return self.receivers.active_peers() | self.senders.active_peers() | self.directory.rank_owners()

    def announce_ranks_again(self) -> None:
        """Announce every local prefill rank to its engine's directory on another daemon again: an
        announce is not answered, so one a restarted directory never got, or one refused while the
        rank's previous daemon (a lost node) was not yet declared dead, is made good here."""
        for pool in self.registry.local.values():
            if pool.layout.role == "prefill" and pool.bootstrap and pool.bootstrap != self.address \
                    and not pool.closing:
                self.directory.announce_rank(pool.layout, pool.bootstrap, pool.key)

    # --- status ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        out = snapshot(StatusSources(self.config, self.started, self.registry, self.senders, self.receivers,
                                     self.peers, self.metrics, self.errors, self._transport, self.tasks))
        out["daemon"]["trust"] = self.trust.describe()
        out["daemon"]["remote_pools"] = len(self.registry.remote_pools)  # peers' pools announced here
        out["daemon"]["pool_announces"] = self.directory.announces()  # ours, to peers
        # Final events kept for late polls, per connection still open (bounded per connection,
        # dropped when it goes: a gone engine's rooms end after it did and are not kept).
        out["daemon"]["ended_events_kept"] = {"connections": len(self._ended_rooms),
                                              "events": sum(len(kept) for kept in self._ended_rooms.values()),
                                              "aux_bytes": sum(self._ended_bytes.values())}
        return out

    def _owned_by_uid(self, conn_id: int) -> list[tuple[int, str, int, str]]:
        """(pool_id, engine, rank, role) of every pool of the connection's uid."""
        uid = self.trust.access.creds(conn_id).uid
        return [(p.pool_id, p.layout.engine_id, p.layout.tp_rank, p.layout.role) for p in self.registry.local.values()
                if self.trust.access.creds(p.conn_id).uid == uid]

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        prepare_socket_path(c.socket_path)  # refuse a live socket before binding anything else
        self.peers.auth = self.trust.load()  # TrustError: no key and not peer.insecure
        self.trust.gate = trust_gate(self)
        # A batch to a stalled peer gives up within the heartbeat window (plus a second).
        timeout = c.heartbeat_interval_s * c.heartbeat_misses + 1.0
        main: Transport = await loop.run_in_executor(None, lambda: MooncakeTransport(
            c.hostname, c.protocol, c.devices, c.workers, c.queues, c.max_batch_ops, transfer_timeout_s=timeout))

        def open_session() -> Transport:
            return MooncakeTransport(c.hostname, c.protocol, c.devices, workers=1, queues=1,
                                     transfer_timeout_s=timeout)

        sessions: Callable[[], Transport] = open_session
        if c.same_node != "off":  # peers on this machine: CUDA IPC copies (kvd.transfer.router)
            from kvd.transfer.router import SameNodeTransport, with_endpoint

            same_node = await loop.run_in_executor(None, SameNodeTransport, main, c.workers, 16, c.copy_launch)
            main = same_node
            sessions = with_endpoint(open_session)  # receive sessions answer same-node peers too
            if c.one_pass:  # head slices straight into a same-node decode pool (PoolAck.one_pass)
                self.directory.same_node_peer = same_node.reaches_peer
                self.directory.device_memory = same_node.device_memory
        self._transport = SessionedTransport(main, sessions)
        # Supervision and healing: the peer loop and housekeeping feed the watchdog; a peer's new
        # incarnation drops what its old one told us; a dropped prefill pool leaves its directory.
        self.watchdog = Watchdog(watchdog_interval())
        self.peers.watchdog = self.watchdog
        self.peers.incarnation = self.boot_id
        self.peers.restart_hooks.append(self.directory.peer_restarted)

        def rooms_of_old_incarnation(peer: str) -> None:
            # Rooms the old process had taken on can never complete; rooms still bootstrapping
            # ask the new one (the directory caches are dropped) and go on.
            self.senders.peer_dead(peer, "restarted decode daemon")
            for rr in list(self.receivers.rooms.values()):
                state = rr.machine.state
                if state is not RoomState.BOOTSTRAPPING and not state.final and peer in rr.peers():
                    self.receivers.fail(rr, f"prefill daemon {peer} restarted (new incarnation)")

        self.peers.restart_hooks.append(rooms_of_old_incarnation)
        self.directory.current = self.peers.current
        self.directory.alive = self.peers.alive
        self.registry.drop_hooks.append(lambda pool: self.directory.withdraw_rank(
            pool.layout, pool.bootstrap or self.address, pool.key) if pool.layout.role == "prefill" else None)
        self.registry.drop_hooks.append(self.directory.pool_dropped)
        self.directory.pools_in_use = self.senders.pool_requests.keys
        if c.pools_gpu:
            log.info("gpu_ready", found=await loop.run_in_executor(None, self.registry.preload_gpu))
        await self.peers.start()
        self.directory.address = self.peers.address
        await self.engines.start()
        await self.trust.start_inbox(self.tasks.spawn)  # host pools arrive as descriptors
        if c.metrics_address:
            port = self.metrics.start_http(c.metrics_address)
            log.info("metrics_listening", address=c.metrics_address, port=port)
        log.info("transport_ready", protocol=self.transport.protocol, devices=self.transport.devices,
                 session=self.transport.session_id, peer_address=self.address,
                 socket=c.socket_path, version=__version__)
        self.watchdog.watch("housekeeping", HOUSEKEEPING_STALE_S, self.now())
        self.tasks.spawn(self._housekeeping(), "housekeeping", critical=True)

    async def _housekeeping(self) -> None:
        """Deadlines, heartbeats, the watchdog and gauges: one cheap pass every 100 ms.

        Each step is guarded: a step that raises is logged with its traceback and counted, the
        other steps still run, and a step failing pass after pass is fatal (TaskOwner.guard).
        The watchdog is pinged only after a pass whose every step succeeded, and only while the
        peer receive loop reports passes too (Watchdog)."""
        guard, last_beat, last_pools = self.tasks.guard, float("-inf"), self.now()
        last_ranks = self.now()
        steps = ("housekeeping.senders", "housekeeping.receivers", "housekeeping.peers", "housekeeping.gauges")
        while True:
            now = self.now()
            with guard(steps[0]):
                self.senders.expire(now)
            with guard(steps[1]):
                self.receivers.expire(now)
            if now - last_beat >= self.config.heartbeat_interval_s:
                last_beat = now
                with guard(steps[2]):
                    self.peers.heartbeat(self.active_peers(), now)
            if now - last_ranks >= self.config.heartbeat_timeout_s:
                last_ranks = now
                with guard(steps[2]):
                    self.announce_ranks_again()
            if now - last_pools >= 1.0:  # pools peers announced that no room used for a while
                last_pools = now
                with guard(steps[2]):
                    self.directory.expire_pools(now)
            with guard(steps[3]):
                self.metrics.set_rooms(room_counts(self.senders, self.receivers))
                if self.registry.staging:  # pool figures only: no walk over the rooms every 100 ms
                    pools = self.registry.staging_figures()
                    self.metrics.set_staging(*(sum(x[k] for x in pools) for k in (
                        "pool_bytes", "reserved_bytes", "in_use_bytes", "waiting")))
            if all(self.tasks.healthy(s) for s in steps) and self.tasks.critical_alive():
                self.watchdog.beat("housekeeping", now)
            self.watchdog.maybe_ping(now)
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        stopping()
        self.registry.stopping = True  # from now on the registrar refuses what is queued
        await self.tasks.close()
        await self.engines.stop()
        await self.peers.stop()
        self.trust.stop()
        self.metrics.stop_http()
        self.registry.close()
        if self._transport is not None:
            self._transport.close()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; a second signal exits at once. A fatal failure (a critical
        loop ended, or keeps failing) shuts down and exits with status 70, so systemd restarts
        kvd instead of keeping a half-dead daemon."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await self.start()
        ready(f"serving on {self.config.socket_path} and {self.address}")
        waits = {loop.create_task(self._stop.wait(), name="serve-stop"),
                 loop.create_task(self.tasks.wait_fatal(), name="serve-fatal")}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        fatal = self.tasks.fatal_reason
        log.info("shutting_down", fatal=fatal)
        try:
            await asyncio.wait_for(self.stop(), timeout=10)
        except TimeoutError:
            log.warning("shutdown_timeout")
        if fatal is not None:
            log.critical("exiting_for_restart", reason=fatal, status=EXIT_FATAL)
            raise SystemExit(EXIT_FATAL)

    def _on_signal(self) -> None:
        if self._stop.is_set():
            os._exit(1)
        self._stop.set()


__all__ = ["Daemon"]
