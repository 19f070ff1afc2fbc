"""The daemon: one asyncio loop wiring engines, peers, transport and the pure parts together.

``Daemon.serve()`` = bind (Unix socket for engines, ZMQ ROUTER for peers, Mooncake) ->
READY -> run until a signal -> graceful shutdown. Everything stateful about rooms
lives in :mod:`kvd.sender` / :mod:`kvd.receiver`; this module routes messages to
them, keeps the pools, the peer directory and the one state object that
``kvctl status`` and the metrics read. Nothing blocking runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections import Counter
from typing import Any

import structlog

from kvd import __version__
from kvd.core.config import Config
from kvd.core.layout import LayoutError, PoolLayout, check_compatible
from kvd.core.rooms import RoomMachine, RoomState
from kvd.mem.memory import open_pool
from kvd.mem.pools import LocalPool, RemotePool
from kvd.obs.metrics import Metrics
from kvd.obs.sdnotify import ready, stopping, watchdog_interval, watchdog_ping
from kvd.shell.engine_server import EngineServer, prepare_socket_path
from kvd.shell.peer_hub import PeerHub
from kvd.sides.receiver import ReceiverSide
from kvd.sides.sender import SenderSide
from kvd.transfer.mooncake import BatchResult, MooncakeTransport
from kvd.wire import protocol as p

log = structlog.get_logger("kvd.daemon")


class Daemon:
    """One per node. Holds every pool, room and peer; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.token = config.auth_token
        self.boot_id = secrets.token_hex(4)
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.transport: MooncakeTransport | None = None
        self.peers = PeerHub(self)
        self.engines = EngineServer(self)
        self.senders = SenderSide(self)
        self.receivers = ReceiverSide(self)
        self.pools: dict[int, LocalPool] = {}
        self._next_pool = 1
        self.remote_pools: dict[str, RemotePool] = {}
        # Directory of prefill engines whose bootstrap is this daemon: engine -> rank -> (layout, daemon).
        self.directory: dict[str, dict[int, tuple[PoolLayout, str]]] = {}
        self.conflicts: dict[str, str] = {}
        self._engine_info: dict[tuple[str, str], p.EngineInfo] = {}
        self._info_waiters: dict[tuple[str, str], list[asyncio.Future]] = {}
        self._announced: dict[tuple[str, str, str], asyncio.Future] = {}
        self.errors: Counter[str] = Counter()
        self.room_paths: Counter[str] = Counter()  # decode rooms started, by path
        self.address = ""
        # Staged path: one registered staging pool per device, kernel tensors per pool.
        self.staging: dict[str, Any] = {}  # device -> kvd.stagemem.StagingPool
        self._peer_staging: dict[tuple[str, str], bool] = {}
        self._kernels: Any = None
        self._stop = asyncio.Event()

    # --- small services the room modules use ---------------------------------------------
    @staticmethod
    def now() -> float:
        return time.monotonic()

    def count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.metrics.error(kind)

    def observe_batch(self, result: BatchResult) -> None:
        self.metrics.observe_batch(result.nbytes, result.seconds, result.ops)

    def observe_room(self, seconds: float) -> None:
        self.metrics.observe_room(seconds)

    def room_changed(self, role: str, before: RoomState | None, after: RoomState, **ctx: Any) -> None:
        log.info("room_state", role=role, state=after.value,
                 previous=before.value if before else None, **ctx)

    def send_peer(self, addr: str, msg: p.Message) -> None:
        self.peers.send(addr, msg)

    def tell_engine(self, pool: LocalPool, event: p.RoomEvent) -> None:
        self.engines.push(pool.conn_id, event)

    def prefill_pool(self, engine_id: str, rank: int) -> LocalPool | None:
        for pool in self.pools.values():
            lay = pool.layout
            if lay.role == "prefill" and lay.engine_id == engine_id and lay.tp_rank == rank \
                    and not pool.closing:
                return pool
        return None

    # --- staging (torch is imported only once staging is on) --------------------------------
    @property
    def kernels(self) -> Any:
        """The gather/scatter runner (kvd.stagemem.KernelRunner), made on first use."""
        if self._kernels is None:
            from kvd.mem.stagemem import KernelRunner

            self._kernels = KernelRunner(self.config.staging_kernel_threads)
        return self._kernels

    def staging_pool(self, pool: LocalPool) -> Any:
        """The staging pool of a local pool's device (None: staging off for it)."""
        return self.staging.get(pool.device) if pool.device else None

    def _ensure_staging(self, device: str) -> Any:
        from kvd.mem.stagemem import StagingPool

        stage = self.staging.get(device)
        if stage is None:
            assert self.transport is not None
            stage = StagingPool(device, self.config.staging_pool_bytes)
            self.transport.register(stage.base, stage.nbytes)
            self.staging[device] = stage
            log.info("staging_ready", device=device, bytes=stage.nbytes, receive_bytes=stage.recv_bytes)
        return stage

    # --- pools ----------------------------------------------------------------------------
    def register_pool(self, conn_id: int, msg: p.RegisterPool) -> LocalPool:
        """Open, check and register an engine's pool (raises LayoutError / ValueError / TransportError)."""
        layout = PoolLayout.from_dict(msg.layout)
        if layout.role == "prefill" and self.prefill_pool(layout.engine_id, layout.tp_rank):
            raise LayoutError(f"prefill rank {layout.engine_id}/{layout.tp_rank} is already registered")
        if self.config.staging_enabled and layout.is_mla:
            raise LayoutError("MLA pools cannot use the staging path (staging.enabled is on): MLA "
                              "sends whole rows and needs no gather; run this engine's daemon with "
                              "staging.enabled = false (KVD_STAGING_ENABLED=0)")
        opened = open_pool(layout, msg.memory)
        assert self.transport is not None
        try:
            for base, length in opened.regions:
                self.transport.register(base, length)
            tensors, device = None, ""
            if self.config.staging_enabled and not layout.hisparse:
                from kvd.mem.stagemem import device_of, pool_tensors

                tensors, device = pool_tensors(layout, opened), device_of(opened)
                self._ensure_staging(device)
        except Exception:
            for base, _ in opened.regions:
                self.transport.unregister(base)
            opened.close()
            raise
        pool_id = self._next_pool
        self._next_pool += 1
        pool = LocalPool(pool_id, f"{self.address}#{self.boot_id}#{pool_id}", layout, opened, conn_id,
                         bootstrap=msg.bootstrap, tensors=tensors, device=device)
        self.pools[pool_id] = pool
        if layout.role == "prefill":
            directory = msg.bootstrap or self.address
            announce = p.RankAnnounce(src=self.address, token=self.token, layout=layout.to_dict())
            if directory == self.address:
                try:
                    self.on_rank_announce(announce)
                except LayoutError:
                    del self.pools[pool_id]
                    for base, _ in opened.regions:
                        self.transport.unregister(base)
                    opened.close()
                    raise
            else:
                self.send_peer(directory, announce)
        log.info("pool_registered", pool=pool.key, layout=layout.describe(),
                 bytes=layout.pool_bytes, memory=msg.memory.get("kind"))
        return pool

    def close_pools_of(self, conn_id: int) -> None:
        """An engine went away: fail its rooms; unregister each pool once nothing can write into it."""
        for pool in [x for x in self.pools.values() if x.conn_id == conn_id]:
            pool.closing = True
            self.senders.pool_closed(pool)
            self.receivers.pool_closed(pool)
        asyncio.get_running_loop().create_task(self._reap_pools())

    async def _reap_pools(self) -> None:
        while True:
            closing = [x for x in self.pools.values() if x.closing]
            busy = self.receivers.busy_pools() | {k[0] for k in self.senders.rooms}
            for pool in closing:
                if pool.pool_id not in busy:
                    del self.pools[pool.pool_id]
                    for base, _ in pool.opened.regions:
                        assert self.transport is not None
                        self.transport.unregister(base)
                    pool.opened.close()
                    log.info("pool_closed", pool=pool.key)
            if not any(x.closing for x in self.pools.values()):
                return
            await asyncio.sleep(0.2)

    # --- directory (this daemon as a prefill engine's bootstrap) -----------------------------
    def on_rank_announce(self, msg: p.RankAnnounce) -> None:
        """Record which daemon serves a prefill rank; ranks that disagree on the layout are refused
        and the conflict is reported to every decode daemon that asks (its rooms fail at once)."""
        layout = PoolLayout.from_dict(msg.layout)
        ranks = self.directory.setdefault(layout.engine_id, {})
        shape = {k: v for k, v in layout.to_dict().items() if k != "tp_rank"}
        for other, _ in ranks.values():
            if other.tp_rank != layout.tp_rank and \
                    {k: v for k, v in other.to_dict().items() if k != "tp_rank"} != shape:
                self.count_error("layout")
                problem = (f"prefill ranks of engine {layout.engine_id!r} disagree on the layout: "
                           f"[{layout.describe()}] vs [{other.describe()}]")
                self.conflicts[layout.engine_id] = problem
                log.warning("rank_layout_mismatch", engine=layout.engine_id, error=problem)
                raise LayoutError(problem)
        ranks[layout.tp_rank] = (layout, msg.src)

    def engine_info_reply(self, engine_id: str) -> p.EngineInfo:
        ranks = self.directory.get(engine_id, {})
        conflict = self.conflicts.get(engine_id, "")
        ready_ = not conflict and bool(ranks) and len(ranks) == next(iter(ranks.values()))[0].tp_size
        ordered = [ranks[r] for r in sorted(ranks)] if ready_ else []
        return p.EngineInfo(src=self.address, token=self.token, engine_id=engine_id, ready=ready_,
                            tp_size=ordered[0][0].tp_size if ordered else 0,
                            layouts=[lay.to_dict() for lay, _ in ordered],
                            daemons=[d for _, d in ordered],
                            error=conflict or ("" if ranks else f"no rank of engine {engine_id!r} registered here"))

    async def engine_info(self, bootstrap: str, engine_id: str, machine: RoomMachine) -> p.EngineInfo:
        """Topology of a prefill engine, asked of its directory until every rank is there."""
        key = (bootstrap, engine_id)
        while key not in self._engine_info:
            deadline = machine.deadline
            if deadline is not None and self.now() >= deadline:
                raise TimeoutError(f"prefill engine {engine_id!r} at {bootstrap} did not become ready")
            if bootstrap == self.address:
                info = self.engine_info_reply(engine_id)
                if engine_id in self.conflicts:
                    raise LayoutError(info.error)
                if info.ready:
                    self._engine_info[key] = info
                    break
            else:
                fut = asyncio.get_running_loop().create_future()
                self._info_waiters.setdefault(key, []).append(fut)
                self.send_peer(bootstrap, p.EngineQuery(src=self.address, token=self.token,
                                                        engine_id=engine_id))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, timeout=0.5)
                if key in self._engine_info:
                    break
                if fut.done() and "disagree" in fut.result().error:
                    raise LayoutError(fut.result().error)
            await asyncio.sleep(0.1)
            if machine.state.final:
                raise ConnectionError(machine.reason or "room ended")
        return self._engine_info[key]

    def on_engine_info(self, msg: p.EngineInfo) -> None:
        key = (msg.src, msg.engine_id)
        if msg.ready:
            if len(msg.layouts) != msg.tp_size or len(msg.daemons) != msg.tp_size:
                self.count_error("bad_peer_message")
                return
            self._engine_info[key] = msg
        for fut in self._info_waiters.pop(key, []):
            if not fut.done():
                fut.set_result(msg)

    async def announce_pool(self, daemon: str, pool: LocalPool, engine_id: str,
                            machine: RoomMachine) -> bool:
        """Announce a decode pool to a sender daemon once; True if both sides will stage."""
        key = (daemon, pool.key, engine_id)
        fut = self._announced.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = asyncio.get_running_loop().create_future()
            self._announced[key] = fut
            assert self.transport is not None
            stage = self.staging_pool(pool)
            self.send_peer(daemon, p.PoolAnnounce(
                src=self.address, token=self.token, pool_key=pool.key, layout=pool.layout.to_dict(),
                buffers=list(pool.buffers), session_id=self.transport.session_id,
                prefill_engine_id=engine_id, staging_base=stage.base if stage else 0,
                staging_bytes=stage.recv_bytes if stage else 0))
        deadline = machine.deadline
        timeout = max(0.1, deadline - self.now()) if deadline is not None else None
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._announced.pop(key, None)
            raise TimeoutError(f"prefill daemon {daemon} did not accept pool {pool.key}") from None
        return self.staging_pool(pool) is not None and self._peer_staging.get((daemon, pool.key), False)

    def on_pool_announce(self, msg: p.PoolAnnounce) -> None:
        error = ""
        try:
            layout = PoolLayout.from_dict(msg.layout)
            if len(msg.buffers) != layout.num_buffers:
                raise LayoutError(f"{len(msg.buffers)} buffers announced, layout has {layout.num_buffers}")
            ranks = self.directory.get(msg.prefill_engine_id) or {}
            local = next((pool.layout for pool in self.pools.values()
                          if pool.layout.engine_id == msg.prefill_engine_id), None)
            sender = local or next((lay for lay, _ in ranks.values()), None)
            if sender is None:
                raise LayoutError(f"no rank of prefill engine {msg.prefill_engine_id!r} is served here")
            check_compatible(sender, layout)
            if msg.staging_base < 0 or msg.staging_bytes < 0:
                raise LayoutError(f"staging range [{msg.staging_base}, +{msg.staging_bytes}) is invalid")
            self.remote_pools[msg.pool_key] = RemotePool(msg.pool_key, layout, list(msg.buffers),
                                                         msg.session_id, msg.src,
                                                         staging_base=msg.staging_base,
                                                         staging_bytes=msg.staging_bytes)
        except (LayoutError, ValueError) as exc:
            self.count_error("layout")
            error = str(exc)
        staging = not error and self.config.staging_enabled and msg.staging_bytes > 0 and bool(self.staging)
        self.send_peer(msg.src, p.PoolAck(src=self.address, token=self.token, pool_key=msg.pool_key,
                                          ok=not error, error=error, staging=staging))

    def on_pool_ack(self, msg: p.PoolAck) -> None:
        for (daemon, pool_key, _), fut in self._announced.items():
            if daemon == msg.src and pool_key == msg.pool_key and not fut.done():
                if msg.ok:
                    self._peer_staging[(daemon, pool_key)] = msg.staging
                    fut.set_result(True)
                else:
                    fut.set_exception(LayoutError(msg.error))
                    fut.exception()  # retrieved: the room that awaits it reports it

    # --- peer message routing --------------------------------------------------------------
    def on_peer_message(self, msg: p.Message) -> None:
        """Dispatch one authenticated peer message; a handler error fails one room, never the loop."""
        match msg:
            case p.Heartbeat():
                self.send_peer(msg.src, p.HeartbeatAck(src=self.address, token=self.token, nonce=msg.nonce))
            case p.HeartbeatAck():
                pass
            case p.RankAnnounce():
                self.on_rank_announce(msg)
            case p.EngineQuery():
                self.send_peer(msg.src, self.engine_info_reply(msg.engine_id))
            case p.EngineInfo():
                self.on_engine_info(msg)
            case p.PoolAnnounce():
                self.on_pool_announce(msg)
            case p.PoolAck():
                self.on_pool_ack(msg)
            case p.TransferRequest():
                self.senders.on_request(msg)
            case p.TransferStatus():
                self.receivers.on_status(msg)
            case p.AbortTransfer():
                self.senders.on_abort(msg)
            case p.AbortAck():
                self.receivers.on_abort_ack(msg)
            case p.StagingGrant():
                self.senders.on_grant(msg)
            case p.ChunkWritten():
                self.receivers.on_chunk_written(msg)
            case _:
                self.count_error("protocol")

    def peer_dead(self, peer: str) -> None:
        self.count_error("peer_dead")
        log.warning("peer_dead", peer=peer)
        self._engine_info = {k: v for k, v in self._engine_info.items() if k[0] != peer}
        self._announced = {k: v for k, v in self._announced.items() if k[0] != peer}
        self.senders.peer_dead(peer)
        self.receivers.peer_dead(peer)

    def active_peers(self) -> set[str]:
        peers = self.receivers.active_peers()
        for sr in self.senders.rooms.values():
            peers |= {r.msg.src for r in sr.requests.values()}
        peers.discard(self.address)
        return peers

    # --- status ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        rooms = self.senders.snapshot() + self.receivers.snapshot()
        counts = self.metrics.snapshot()
        t = self.transport
        return {
            "daemon": {
                "version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "hostname": self.config.hostname, "peer_address": self.address,
                "transport": {"protocol": t.protocol if t else "-", "devices": t.devices if t else "-",
                              "session_id": t.session_id if t else "-"},
                "staging": self._staging_snapshot(),
                "errors": dict(self.errors),
                "rooms_by_path": dict(self.room_paths),
                "bytes_total": int(counts.get("bytes_sent", 0)),
                "write_ops_total": int(counts.get("write_ops", 0)),
                "pools": [{"pool_id": x.pool_id, "key": x.key, "layout": x.layout.describe()}
                          for x in self.pools.values()],
            },
            "rooms": rooms,
            "peers": self.peers.snapshot(rooms),
        }

    def _staging_snapshot(self) -> dict[str, Any]:
        pools = [stage.stats() for stage in self.staging.values()]
        return {"enabled": self.config.staging_enabled,
                "pool_bytes": sum(x["pool_bytes"] for x in pools),
                "reserved_bytes": sum(x["reserved_bytes"] for x in pools),
                "in_use_bytes": sum(x["in_use_bytes"] for x in pools),
                "waiting_rooms": sum(x["waiting"] for x in pools),
                "whole": all(x["whole"] for x in pools),
                "staged_rooms": sum(1 for rr in self.receivers.rooms.values() if rr.staged)
                + sum(1 for sr in self.senders.rooms.values() if sr.path == "staged"),
                "kernel_seconds": {k: round(v, 4) for k, v in
                                   (self._kernels.busy_s.items() if self._kernels else ())},
                "pools": pools}

    def _update_room_gauges(self) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for sr in self.senders.rooms.values():
            counts[("prefill", sr.machine.state.value)] += 1
        for rr in self.receivers.rooms.values():
            counts[("decode", rr.machine.state.value)] += 1
        for role in ("prefill", "decode"):
            for state in RoomState:
                counts.setdefault((role, state.value), 0)
        self.metrics.set_rooms(counts)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        prepare_socket_path(c.socket_path)  # refuse a live socket before binding anything else
        self.transport = await loop.run_in_executor(None, lambda: MooncakeTransport(
            c.hostname, c.protocol, c.devices, c.workers, c.queues, c.max_batch_ops))
        await self.peers.start()
        await self.engines.start()
        if c.metrics_address:
            port = self.metrics.start_http(c.metrics_address)
            log.info("metrics_listening", address=c.metrics_address, port=port)
        log.info("transport_ready", protocol=self.transport.protocol, devices=self.transport.devices,
                 session=self.transport.session_id, peer_address=self.address,
                 socket=c.socket_path, version=__version__)
        self._tasks = [loop.create_task(self._housekeeping())]

    async def _housekeeping(self) -> None:
        """Deadlines, heartbeats, the watchdog and gauges: one cheap pass every 100 ms."""
        interval = watchdog_interval()
        last_ping = last_beat = 0.0
        while True:
            now = self.now()
            self.senders.expire(now)
            self.receivers.expire(now)
            if now - last_beat >= self.config.heartbeat_interval_s:
                last_beat = now
                self.peers.heartbeat(self.active_peers(), now)
            if interval and now - last_ping >= interval:
                last_ping = now
                watchdog_ping()
            self._update_room_gauges()
            if self.staging:  # pool figures only: no walk over the rooms every 100 ms
                pools = [stage.stats() for stage in self.staging.values()]
                self.metrics.set_staging(*(sum(x[k] for x in pools)
                                           for k in ("pool_bytes", "reserved_bytes", "in_use_bytes", "waiting")))
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        stopping()
        for task in getattr(self, "_tasks", []):
            task.cancel()
        await self.engines.stop()
        await self.peers.stop()
        self.metrics.stop_http()
        for stage in self.staging.values():
            stage.close()
        if self._kernels is not None:
            self._kernels.close()
        for pool in self.pools.values():
            pool.tensors = None
            pool.opened.close()
        if self.transport is not None:
            self.transport.close()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; a second signal exits at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        await self.start()
        ready(f"serving on {self.config.socket_path} and {self.address}")
        await self._stop.wait()
        log.info("shutting_down")
        try:
            await asyncio.wait_for(self.stop(), timeout=10)
        except TimeoutError:
            log.warning("shutdown_timeout")

    def _on_signal(self) -> None:
        if self._stop.is_set():
            os._exit(1)
        self._stop.set()
