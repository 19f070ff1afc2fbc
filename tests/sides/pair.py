"""In-process pair harness for the room sides (h11's ConnectionPair idea).

A :class:`Cluster` holds fake daemons in one process and one event loop. Each
:class:`FakeDaemon` is a real :class:`~kvd.sides.context.RoomContext` with real
:class:`SenderSide` / :class:`ReceiverSide` objects, but:

* peer messages go through an in-memory queue (:class:`Cluster.deliver`), which a test may
  hold back, drop or replay;
* bytes move with :class:`~kvd.transfer.memcpy.MemcpyTransport` between numpy pools of this
  process (bounds-checked against the registered regions);
* the directory and pool announce are answered from the cluster's registered pools;
* the clock is a test-controlled :class:`Clock`.

Nothing here opens a socket or starts a process: a transfer runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvd.core.config import Config
from kvd.core.layout import PoolLayout
from kvd.core.rooms import RoomState
from kvd.mem.memory import OpenedPool
from kvd.mem.pools import LocalPool, RemotePool
from kvd.sides.context import EngineNotReady, PoolAccepted
from kvd.sides.receiver import ReceiverSide
from kvd.sides.sender import SenderSide
from kvd.sides.tasks import TaskOwner
from kvd.transfer.base import BatchResult
from kvd.transfer.memcpy import MemcpyFabric, MemcpyTransport
from kvd.wire import engine as we
from kvd.wire import peer as wp
from kvd.wire.codec import Message


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class ArrayPool:
    """A host pool as one numpy array; ``buffer(b)`` is ``[tokens, local heads, head bytes]``
    (what tools.kvpattern fills and verifies)."""

    def __init__(self, layout: PoolLayout, fill: int = 0) -> None:
        self.layout = layout
        self.array = np.full(layout.num_buffers * layout.buffer_bytes, fill, dtype=np.uint8)
        self.base = self.array.ctypes.data

    def buffer(self, b: int) -> np.ndarray:
        lay = self.layout
        flat = self.array[b * lay.buffer_bytes:(b + 1) * lay.buffer_bytes]
        return flat.reshape(lay.num_tokens, lay.local_heads, lay.head_bytes)

    def opened(self) -> OpenedPool:
        lay = self.layout
        return OpenedPool(buffers=[self.base + b * lay.buffer_bytes for b in range(lay.num_buffers)],
                          regions=[(self.base, self.array.nbytes)], _keep=[self.array])


@dataclass
class Delivery:
    src: str
    dst: str
    msg: Message


@dataclass
class FakeDaemon:
    """One daemon's room sides over in-memory peers and a memcpy transport."""

    cluster: Cluster
    address: str
    config: Config
    local: dict[int, LocalPool] = field(default_factory=dict)
    remote_pools: dict[str, RemotePool] = field(default_factory=dict)
    events: list[tuple[int, we.RoomEvent]] = field(default_factory=list)  # (pool id, event)
    errors: Counter[str] = field(default_factory=Counter)
    states: list[tuple[str, int, str]] = field(default_factory=list)  # (role, room, state)
    received: int = 0
    inline_bytes: int = 0  # sent inside statuses (kvd.core.inline)
    sessions: dict[str, MemcpyTransport] = field(default_factory=dict)  # per-peer receive sessions
    revoked: list[str] = field(default_factory=list)
    generation: int = 0
    # Set: a revocation holds (its session already closed) until the gate opens, as closing a
    # Mooncake engine takes ~1 s in the daemon; announces to that peer wait for it meanwhile.
    revoke_gate: asyncio.Event | None = None
    revoking: dict[str, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pools = self
        self.bootstrap = self
        self._transport = MemcpyTransport(self.address, self.cluster.fabric)
        self.tasks = TaskOwner(on_crash=lambda name, exc: self.count_error("task_crash"))
        self.senders = SenderSide(self)
        self.receivers = ReceiverSide(self)
        self.routes: dict[type, Any] = {**self.senders.handlers(), **self.receivers.handlers()}
        self._next_pool = 1
        self._stage: Any = None
        self._kernels: Any = None

    # --- RoomContext ---------------------------------------------------------------------
    @property
    def transport(self) -> MemcpyTransport:
        return self._transport

    @property
    def kernels(self) -> Any:
        if self._kernels is None:
            from kvd.mem.stagemem import KernelRunner

            self._kernels = KernelRunner(1)
        return self._kernels

    def now(self) -> float:
        return self.cluster.clock.now()

    def send_peer(self, addr: str, msg: Message) -> None:
        self.cluster.send(self.address, addr, msg)

    def tell_engine(self, pool: LocalPool, event: we.RoomEvent) -> None:
        self.events.append((pool.pool_id, event))

    def count_error(self, kind: str) -> None:
        self.errors[kind] += 1

    def room_changed(self, role: str, before: RoomState | None, after: RoomState, **ctx: Any) -> None:
        self.states.append((role, int(ctx.get("room", -1)), after.value))

    def observe_batch(self, result: BatchResult) -> None:
        pass

    def observe_inline(self, nbytes: int) -> None:
        self.inline_bytes += nbytes

    def observe_room(self, seconds: float, nbytes: int) -> None:
        self.received += nbytes

    def staging_pool(self, pool: LocalPool) -> Any:
        return self._stage if pool.device else None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro, name)

    # --- PoolLookup ------------------------------------------------------------------------
    def prefill_pool(self, engine_id: str, rank: int) -> LocalPool | None:
        for pool in self.local.values():
            if pool.layout.role == "prefill" and pool.layout.engine_id == engine_id and pool.layout.tp_rank == rank:
                return pool
        return None

    def remote(self, pool_key: str) -> RemotePool | None:
        return self.remote_pools.get(pool_key)

    # --- Bootstrap (answered from the cluster's pools) --------------------------------------
    async def engine_info(self, bootstrap: str, engine_id: str, deadline: float | None) -> wp.EngineInfo:
        while True:
            ranks = self.cluster.prefill_ranks(engine_id)
            if ranks and len(ranks) == ranks[0][0].tp_size:
                return wp.EngineInfo(src=bootstrap, engine_id=engine_id, ready=True, tp_size=len(ranks),
                                     layouts=[lay.to_dict() for lay, _ in ranks], daemons=[d for _, d in ranks])
            if deadline is not None and self.now() >= deadline:
                raise EngineNotReady(f"prefill engine {engine_id!r} did not become ready")
            await asyncio.sleep(0)

    def engine_info_now(self, bootstrap: str, engine_id: str) -> wp.EngineInfo | None:
        ranks = self.cluster.prefill_ranks(engine_id)
        if ranks and len(ranks) == ranks[0][0].tp_size:
            return wp.EngineInfo(src=bootstrap, engine_id=engine_id, ready=True, tp_size=len(ranks),
                                 layouts=[lay.to_dict() for lay, _ in ranks], daemons=[d for _, d in ranks])
        return None

    def pool_accepted_now(self, daemon: str, pool: LocalPool, engine_id: str) -> PoolAccepted | None:
        peer = self.cluster.nodes[daemon]
        if pool.key not in peer.remote_pools or self.sessions.get(daemon) is None:
            return None  # never announced there, or its session was revoked since
        stage = self.staging_pool(pool)
        return PoolAccepted(stage is not None and peer._stage is not None,
                            peer._stage.send_capacity if peer._stage is not None else 0, self.cluster.one_pass)

    def forget_announce(self, daemon: str, pool_key: str) -> None:
        pass  # acceptance is read from the peer's pools each time (pool_accepted_now)

    async def announce_pool(self, daemon: str, pool: LocalPool, engine_id: str,
                            deadline: float | None) -> PoolAccepted:
        peer = self.cluster.nodes[daemon]
        stage = self.staging_pool(pool)
        if daemon in self.revoking:  # as SessionedTransport.receive_session: never the one being revoked
            await self.revoking[daemon].wait()
        session = self.receive_session(daemon)
        peer.remote_pools[pool.key] = RemotePool(pool.key, pool.layout, list(pool.buffers), session,
                                                 self.address, staging_base=stage.base if stage else 0,
                                                 staging_bytes=stage.recv_bytes if stage else 0)
        return PoolAccepted(stage is not None and peer._stage is not None,
                            peer._stage.send_capacity if peer._stage is not None else 0, self.cluster.one_pass)

    def receive_session(self, peer: str) -> str:
        """A memcpy transport of this daemon's memory that only ``peer`` is told about."""
        session = self.sessions.get(peer)
        if session is None:
            self.generation += 1
            session = MemcpyTransport(f"{self.address}<-{peer}#{self.generation}", self.cluster.fabric)
            for addr, length in self._transport.regions():
                session.register(addr, length)
            self.sessions[peer] = session
        return session.session_id

    async def revoke_peer(self, peer: str, reason: str) -> None:
        session = self.sessions.pop(peer, None)
        self.revoked.append(peer)
        if session is not None:
            session.close()
        if self.revoke_gate is not None:
            done = self.revoking[peer] = asyncio.Event()
            try:
                await self.revoke_gate.wait()
            finally:
                del self.revoking[peer]
                done.set()

    # --- set-up ---------------------------------------------------------------------------
    def enable_staging(self, nbytes: int = 8 << 20) -> None:
        from kvd.mem.stagemem import StagingPool

        self._stage = StagingPool("cpu", nbytes)
        self._transport.register(self._stage.base, self._stage.nbytes)

    def add_pool(self, layout: PoolLayout, fill: int = 0) -> tuple[LocalPool, ArrayPool]:
        arrays = ArrayPool(layout, fill)
        opened = arrays.opened()
        for base, length in opened.regions:
            self._transport.register(base, length)
        tensors, device = None, ""
        if self._stage is not None and not layout.hisparse:
            from kvd.mem.stagemem import pool_tensors

            tensors, device = pool_tensors(layout, opened), "cpu"
        # One engine connection per pool, as engine ranks (one process each) register them.
        pool = LocalPool(self._next_pool, f"{self.address}#{self._next_pool}", layout, opened, conn_id=self._next_pool,
                         tensors=tensors, device=device)
        self._next_pool += 1
        self.local[pool.pool_id] = pool
        self.cluster.keep.append(arrays)
        return pool, arrays

    def route(self, msg: Message) -> None:
        handler = self.routes.get(type(msg))
        if handler is None:
            self.count_error("protocol")
        else:
            handler(msg)

    def final_event(self, pool: LocalPool, room: int) -> we.RoomEvent | None:
        for pid, ev in self.events:
            if pid == pool.pool_id and ev.room == room and ev.released:
                return ev
        return None


class Cluster:
    """Fake daemons, an in-memory peer queue between them, one memcpy fabric, one clock."""

    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.fabric = MemcpyFabric()
        self.nodes: dict[str, FakeDaemon] = {}
        self.config = Config(**({"waiting_timeout_s": 5.0, "transfer_timeout_s": 5.0, "bootstrap_timeout_s": 5.0,
                                 "abort_fence_s": 2.0, "staging_chunk_tokens": 16,
                                 # transport writes unless a test asks for inline ones (kvd.core.inline)
                                 "inline_max_bytes": 0} | config))
        self.log: list[Delivery] = []
        self.hold: Callable[[Delivery], bool] = lambda d: False  # True: keep it back
        self.one_pass = False  # what every sender daemon answers a pool announce (same node, GPU)
        self.held: list[Delivery] = []
        self.keep: list[ArrayPool] = []

    def daemon(self, name: str) -> FakeDaemon:
        node = FakeDaemon(self, f"mem://{name}", self.config)
        self.nodes[node.address] = node
        return node

    def prefill_ranks(self, engine_id: str) -> list[tuple[PoolLayout, str]]:
        found = [(pool.layout, node.address) for node in self.nodes.values() for pool in node.local.values()
                 if pool.layout.role == "prefill" and pool.layout.engine_id == engine_id]
        return sorted(found, key=lambda x: x[0].tp_rank)

    def send(self, src: str, dst: str, msg: Message) -> None:
        d = Delivery(src, dst, wp.stamped(msg, src, "")) if isinstance(msg, wp.PeerMessage) else Delivery(src, dst, msg)
        self.log.append(d)
        if self.hold(d):
            self.held.append(d)
        else:
            asyncio.get_running_loop().call_soon(self._deliver, d)

    def _deliver(self, d: Delivery) -> None:
        node = self.nodes.get(d.dst)
        if node is not None:
            node.route(d.msg)

    def release_held(self) -> None:
        held, self.held = self.held, []
        for d in held:
            asyncio.get_running_loop().call_soon(self._deliver, d)

    def sent(self, kind: type) -> list[Any]:
        return [d.msg for d in self.log if isinstance(d.msg, kind)]

    async def settle(self, rounds: int = 200) -> None:
        """Let queued messages, writes and tasks run until nothing is left to do (bounded)."""
        for _ in range(rounds):
            await asyncio.sleep(0)
        idle = 0
        while idle < 3:
            busy = sum(len(n.tasks) for n in self.nodes.values())
            await asyncio.sleep(0.001)
            idle = idle + 1 if busy == 0 else 0
            rounds -= 1
            if rounds < -2000:
                break

    def expire(self) -> None:
        for node in self.nodes.values():
            node.senders.expire(self.clock.now())
            node.receivers.expire(self.clock.now())

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.tasks.close()
            if node._kernels is not None:
                node._kernels.close()
            if node._stage is not None:
                node._stage.close()


def layout(role: str, tp_size: int, tp_rank: int, *, engine: str = "prefill-0", layers: int = 2, kv_heads: int = 4,
           head_dim: int = 8, page_size: int = 4, num_pages: int = 32, hisparse: bool = False) -> PoolLayout:
    if hisparse and role == "decode":
        num_pages, page_size = num_pages * page_size, 1
    return PoolLayout(engine_id=engine if role == "prefill" else f"decode-{tp_rank}", role=role, tp_size=tp_size,
                      tp_rank=tp_rank, num_layers=layers, total_kv_heads=kv_heads, head_dim=head_dim,
                      dtype="float16", page_size=page_size, num_pages=num_pages, hisparse=hisparse)


def address_of(arr: np.ndarray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(arr))


__all__ = ["Cluster", "FakeDaemon", "ArrayPool", "Clock", "layout"]
