"""A byte-exact sweep harness over the in-process pair (tests/sides/pair.py).

The reference is computed here with numpy, independently of kvd's head ownership and planner:
a global KV array ``G[buffer, token, head, byte]`` of random bytes per prefill engine; prefill
rank ``t`` of a TP group of ``T`` holds heads ``[t*H/T, (t+1)*H/T)`` (the one head ``t // (T/H)``
when ``H < T``; MLA: the latent head, everywhere). A decode rank's whole pool must be the canary
but for its rooms' destination rows, which hold ``G`` of the matching source rows for the rank's
own heads; every room must succeed on every rank, with its aux, and leave no error counted.

Engines may differ in shape and share the daemons (several rooms at once, several engines), ranks
may be spread over several daemons, chunks may be uneven or empty, and the prefill engine may
finish before the decode engine asks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvd.core.layout import PoolLayout
from kvd.core.planner import PlanError
from kvd.mem.pools import LocalPool
from kvd.wire import engine as we
from tests.sides.pair import ArrayPool, Cluster, FakeDaemon

CANARY = 0xA5
ITEM_DTYPE = {1: "uint8", 2: "float16", 4: "float32"}


def heads_of(total: int, tp: int, rank: int) -> list[int]:
    """Global KV heads rank ``rank`` of a TP group holds (restated here, not kvd's code)."""
    if total >= tp:
        per = total // tp
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (tp // total)]


@dataclass
class Room:
    room: int
    src_pages: np.ndarray  # prefill pages (the same on every rank)
    dst: np.ndarray  # decode pages, or HiSparse token indices
    tokens: int  # the room's length
    chunks: list[int]  # pages per engine chunk (0: an empty chunk)


@dataclass
class Engines:
    """One prefill engine (TP ``prefill_tp``) and one decode engine (TP ``decode_tp``) of a model."""

    name: str
    prefill_tp: int
    decode_tp: int
    kv_heads: int = 4
    layers: int = 2
    head_dim: int = 8
    dtype: str = "float16"
    page_size: int = 4
    num_pages: int = 32
    mla: bool = False
    hisparse: bool = False
    seed: int = 0
    src: list[tuple[LocalPool, ArrayPool]] = field(default_factory=list)
    dst: list[tuple[LocalPool, ArrayPool]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # chunks the sender side refused
    pds: list[FakeDaemon] = field(default_factory=list)
    dds: list[FakeDaemon] = field(default_factory=list)
    G: Any = None

    def layout(self, role: str, rank: int) -> PoolLayout:
        dec = role == "decode"
        page, pages = self.page_size, self.num_pages
        if dec and self.hisparse:
            pages, page = pages * page, 1
        return PoolLayout(engine_id=self.name if not dec else f"{self.name}-decode", role=role,
                          tp_size=self.decode_tp if dec else self.prefill_tp, tp_rank=rank,
                          num_layers=self.layers, total_kv_heads=1 if self.mla else self.kv_heads,
                          head_dim=self.head_dim, dtype=self.dtype, page_size=page, num_pages=pages,
                          is_mla=self.mla, hisparse=self.hisparse and dec)

    def build(self, prefill: list[FakeDaemon], decode: list[FakeDaemon]) -> None:
        """Pools of rank ``r`` on daemon ``r % len(daemons)``; prefill pools hold G's heads."""
        self.pds, self.dds = prefill, decode
        lay0 = self.layout("prefill", 0)
        total = lay0.total_kv_heads
        self.G = np.random.default_rng(self.seed).integers(
            0, 256, size=(lay0.num_buffers, lay0.num_tokens, total, lay0.head_bytes), dtype=np.uint8)
        for r in range(self.prefill_tp):
            pool, arrays = prefill[r % len(prefill)].add_pool(self.layout("prefill", r))
            heads = heads_of(total, self.prefill_tp, r)
            for b in range(lay0.num_buffers):
                arrays.buffer(b)[...] = self.G[b][:, heads, :]
            self.src.append((pool, arrays))
        for r in range(self.decode_tp):
            self.dst.append(decode[r % len(decode)].add_pool(self.layout("decode", r), fill=CANARY))

    def make_room(self, room: int, tokens: int, chunks: list[int] | None, rng: np.random.Generator,
                  used_src: set[int], used_dst: set[int], contiguous: bool = False) -> Room:
        """Pages (or HiSparse tokens) no other room of this engine uses, random or in one run."""
        n_pages = -(-tokens // self.page_size)
        free = [p for p in range(self.num_pages) if p not in used_src]
        src = np.array(free[:n_pages] if contiguous else rng.choice(free, n_pages, replace=False), np.int64)
        n_dst = tokens if self.hisparse else n_pages
        space = self.num_pages * (self.page_size if self.hisparse else 1)
        free = [p for p in range(space) if p not in used_dst]
        dst = np.array(free[:n_dst] if contiguous else rng.choice(free, n_dst, replace=False), np.int64)
        used_src.update(src.tolist())
        used_dst.update(dst.tolist())
        chunks = [n_pages] if chunks is None else chunks
        assert sum(chunks) == n_pages, (chunks, n_pages)
        return Room(room, src, dst, tokens, chunks)

    def recv(self, rm: Room) -> None:
        for r, (pool, _) in enumerate(self.dst):
            self.dds[r % len(self.dds)].receivers.start(pool, we.RecvRoom(
                req_id=rm.room, pool_id=pool.pool_id, room=rm.room, bootstrap_addr=self.pds[0].address,
                prefill_engine_id=self.name, pages=rm.dst, timeout_s=0.0, enable_hisparse=self.hisparse))

    def send_chunk(self, rm: Room, i: int) -> None:
        offset = sum(rm.chunks[:i])
        last = i == len(rm.chunks) - 1
        for r, (pool, _) in enumerate(self.src):
            try:
                self.pds[r % len(self.pds)].senders.on_chunk(pool, we.SendChunk(
                    req_id=rm.room, pool_id=pool.pool_id, room=rm.room,
                    pages=rm.src_pages[offset:offset + rm.chunks[i]], is_last=last,
                    aux=b"aux-%d" % rm.room if last else b"", page_offset=offset))
            except PlanError as exc:  # the engine's error reply
                self.refused.append(str(exc))

    async def send(self, rm: Room, stepwise: bool) -> None:
        for i in range(len(rm.chunks)):
            self.send_chunk(rm, i)
            if stepwise:  # each chunk written before the next one comes
                await quick_settle(50)

    def expected(self, rank: int, rooms: list[Room]) -> np.ndarray:
        lay = self.dst[rank][0].layout
        heads = heads_of(self.G.shape[2], self.decode_tp, rank)
        out = np.full(lay.num_buffers * lay.buffer_bytes, CANARY, dtype=np.uint8)
        view = out.reshape(lay.num_buffers, lay.num_tokens, len(heads), lay.head_bytes)
        for rm in rooms:
            src = (rm.src_pages[:, None] * self.page_size + np.arange(self.page_size)[None, :]).reshape(-1)
            if self.hisparse:
                src, dst = src[:rm.tokens], rm.dst
            else:
                dst = (rm.dst[:, None] * lay.page_size + np.arange(lay.page_size)[None, :]).reshape(-1)
            for b in range(lay.num_buffers):
                view[b, dst] = self.G[b][src][:, heads, :]
        return out

    def check(self, rooms: list[Room]) -> list[str]:
        problems = [f"{self.name}: chunks refused: {self.refused[:2]}"] if self.refused else []
        for r, (pool, arrays) in enumerate(self.dst):
            want, got = self.expected(r, rooms), arrays.array
            if not np.array_equal(want, got):
                lay = pool.layout
                first = int(np.flatnonzero(want != got)[0])
                b, rest = divmod(first, lay.buffer_bytes)
                problems.append(f"{self.name} decode rank {r}: {int((want != got).sum())} bytes differ (first: "
                                f"buffer {b} token {rest // lay.token_bytes} byte {rest % lay.token_bytes}; "
                                f"got {got[first]:#x}, want {want[first]:#x})")
            for rm in rooms:
                ev = self.dds[r % len(self.dds)].final_event(pool, rm.room)
                if ev is None or ev.state != "success" or ev.aux != b"aux-%d" % rm.room:
                    problems.append(f"{self.name} decode rank {r} room {rm.room}: {ev}")
        return problems


async def quick_settle(rounds: int = 400) -> None:
    """Let queued messages and pure-asyncio tasks run. (``Cluster.settle`` waits for every task to
    end: a staged sender waiting for its chunks would hold it to its bound.)"""
    for _ in range(rounds):
        await asyncio.sleep(0)
    await asyncio.sleep(0.002)
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run_case(engines: list[Engines], rooms_per: list[list[dict[str, Any]]], *, staged: bool = False,
                   inline: int = 0, config: dict[str, Any] | None = None, stage_bytes: int = 8 << 20,
                   stepwise: bool = False, one_pass: bool = False, nodes: tuple[int, int] = (1, 1),
                   send_first: bool = False, patience_s: float = 0.0) -> tuple[list[str], Cluster]:
    """Every engine's rooms between ``nodes`` prefill and decode daemons; the problems found.

    ``rooms_per[e]``: engine ``e``'s rooms, ``{"tokens": n, "chunks": [pages, ...],
    "contiguous": bool}``. ``send_first``: every chunk before the decode engine asks.
    ``patience_s``: settle rounds (about 0.1 s each) to wait for long staged rooms."""
    cluster = Cluster(inline_max_bytes=inline, **(config or {}))
    cluster.one_pass = one_pass
    try:
        pds = [cluster.daemon(f"prefill{i}") for i in range(nodes[0])]
        dds = [cluster.daemon(f"decode{i}") for i in range(nodes[1])]
        if staged:
            for node in pds + dds:
                node.enable_staging(stage_bytes)
        rng = np.random.default_rng(123)
        plans: list[tuple[Engines, list[Room]]] = []
        room_id = 1
        for eng, specs in zip(engines, rooms_per, strict=True):
            eng.build(pds, dds)
            used_src: set[int] = set()
            used_dst: set[int] = set()
            rooms = []
            for spec in specs:
                rooms.append(eng.make_room(room_id, spec["tokens"], spec.get("chunks"), rng, used_src, used_dst,
                                           spec.get("contiguous", False)))
                room_id += 1
            plans.append((eng, rooms))
        if send_first:
            for eng, rooms in plans:
                for rm in rooms:
                    await eng.send(rm, stepwise)
            await quick_settle()
        for eng, rooms in plans:
            for rm in rooms:
                eng.recv(rm)
        await quick_settle()
        if not send_first:
            for eng, rooms in plans:
                for rm in rooms:
                    await eng.send(rm, stepwise)
        await cluster.settle()
        for _ in range(int(patience_s * 10)):
            if not any(n.receivers.rooms or n.senders.rooms for n in pds + dds):
                break
            await cluster.settle()
        problems = [p for eng, rooms in plans for p in eng.check(rooms)]
        for node in pds + dds:
            bad = [ev for _, ev in node.events if ev.released and ev.state != "success"]
            if bad:
                problems.append(f"{node.address}: rooms not successful: {bad[:2]}")
            if node.errors:
                problems.append(f"{node.address}: errors {dict(node.errors)}")
            if node.receivers.rooms or node.senders.rooms:
                problems.append(f"{node.address}: rooms left: {len(node.receivers.rooms)} receiving, "
                                f"{len(node.senders.rooms)} sending")
        return problems, cluster
    finally:
        await cluster.close()


__all__ = ["CANARY", "ITEM_DTYPE", "Engines", "Room", "heads_of", "quick_settle", "run_case"]
