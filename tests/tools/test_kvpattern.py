"""Tests of tools/kvpattern.py (fill and byte-exact verify) and of the fake engine ranks of
tools/fake_engine.py, the latter against a tiny copying fake daemon (no real kvd)."""

from __future__ import annotations

import asyncio
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvd import protocol as p
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.support import ThreadedEngineServer
from tools.fake_engine import RoomPlan, build_layout, run_decode_rank, run_prefill_rank
from tools.kvpattern import (
    expected_receiver_token,
    fill_canary,
    fill_prefill,
    pages_to_tokens,
    pattern,
    verify_decode,
)

CANARY = 0x5A


def layout(role: str, tp: int, rank: int, heads: int = 4, mla: bool = False, page_size: int = 4,
           num_pages: int = 8, hisparse: bool = False) -> PoolLayout:
    return build_layout(role, f"{role}-eng", tp, rank, 2, heads, 8, "bfloat16", page_size, num_pages,
                        mla=mla, hisparse=hisparse)


def transfer(src_pools: list[HostPool], dst: HostPool, src_tok: np.ndarray, dst_tok: np.ndarray) -> None:
    """What kvd must achieve: each receiver head gets the bytes of some sender holding it."""
    dl = dst.layout
    for j, g in enumerate(dl.head_range()):
        src = next(s for s in src_pools if g in s.layout.head_range())
        jj = list(src.layout.head_range()).index(g)
        for b in range(dl.num_buffers):
            dst.buffer(b)[dst_tok, j] = src.buffer(b)[src_tok, jj]


@pytest.fixture
def pools() -> Iterator[list[HostPool]]:
    made: list[HostPool] = []
    yield made
    for pool in made:
        pool.close()


def prefill_pools(made: list[HostPool], tp: int, heads: int = 4, mla: bool = False, seed: int = 3,
                  page_size: int = 4) -> list[HostPool]:
    out = []
    for r in range(tp):
        lay = layout("prefill", tp, r, heads, mla, page_size=page_size)
        pool = HostPool.create(lay)
        fill_prefill(pool, lay, seed)
        made.append(pool)
        out.append(pool)
    return out


def test_pattern_is_deterministic_and_sensitive() -> None:
    toks = np.arange(6, dtype=np.uint64)
    a = pattern(1, 0, toks, [0, 1], 16)
    assert a.shape == (6, 2, 16) and a.dtype == np.uint8
    assert np.array_equal(a, pattern(1, 0, toks, [0, 1], 16))
    for other in (pattern(2, 0, toks, [0, 1], 16), pattern(1, 1, toks, [0, 1], 16),
                  pattern(1, 0, toks + np.uint64(1), [0, 1], 16), pattern(1, 0, toks, [1, 2], 16)):
        assert (other != a).mean() > 0.9
    assert len(np.unique(a)) > 100  # bytes look random, not a few repeated values


def test_pages_to_tokens() -> None:
    assert pages_to_tokens([2, 0], 4).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    assert pages_to_tokens([2, 0], 4, length=6).tolist() == [8, 9, 10, 11, 0, 1]
    assert pages_to_tokens([], 4).tolist() == []


def test_gqa_replicas_hold_identical_bytes(pools: list[HostPool]) -> None:
    # 2 KV heads over TP 4: ranks 0,1 hold head 0 and ranks 2,3 head 1
    src = prefill_pools(pools, tp=4, heads=2)
    for b in range(src[0].layout.num_buffers):
        assert np.array_equal(src[0].buffer(b), src[1].buffer(b))
        assert np.array_equal(src[2].buffer(b), src[3].buffer(b))
        assert not np.array_equal(src[0].buffer(b), src[2].buffer(b))


def test_mla_ranks_hold_identical_bytes(pools: list[HostPool]) -> None:
    src = prefill_pools(pools, tp=2, mla=True)
    assert src[0].layout.num_buffers == 2 and src[0].layout.local_heads == 1
    assert np.array_equal(src[0].buffer(1), src[1].buffer(1))


def test_expected_receiver_token_matches_the_pool(pools: list[HostPool]) -> None:
    src = prefill_pools(pools, tp=2)
    lay = src[1].layout
    exp = expected_receiver_token(3, 13, list(lay.head_range()), lay.head_bytes, seed=3)
    assert np.array_equal(src[1].buffer(3)[13], exp)


@pytest.mark.parametrize("p_tp, d_tp, heads", [(2, 1, 4), (1, 4, 4), (2, 4, 8), (4, 2, 8), (4, 1, 2),
                                               (1, 4, 2), (2, 2, 1)])
def test_hetero_tp_transfer_verifies(pools: list[HostPool], p_tp: int, d_tp: int, heads: int) -> None:
    src = prefill_pools(pools, p_tp, heads)
    src_tok = pages_to_tokens([1, 5, 2], 4)
    dst_tok = pages_to_tokens([7, 0, 3], 4)
    for r in range(d_tp):
        lay = layout("decode", d_tp, r, heads)
        dst = HostPool.create(lay)
        pools.append(dst)
        fill_canary(dst, CANARY)
        assert verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY)  # nothing arrived yet
        transfer(src, dst, src_tok, dst_tok)
        assert verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY) == []
        assert verify_decode(dst, lay, src_tok, dst_tok, 4, CANARY)  # wrong seed is caught


def test_corrupted_byte_and_stray_write_are_reported(pools: list[HostPool]) -> None:
    src = prefill_pools(pools, tp=1)
    lay = layout("decode", 2, 1)
    dst = HostPool.create(lay)
    pools.append(dst)
    fill_canary(dst, CANARY)
    src_tok, dst_tok = pages_to_tokens([0, 1], 4), pages_to_tokens([4, 6], 4)
    transfer(src, dst, src_tok, dst_tok)
    dst.buffer(2)[dst_tok[5], 1, 7] ^= 0xFF
    problems = verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY)
    assert len(problems) == 1
    assert "buffer 2" in problems[0] and f"dst token {dst_tok[5]}" in problems[0]
    assert "head 3" in problems[0] and "first at byte 7" in problems[0]
    dst.buffer(2)[dst_tok[5], 1, 7] ^= 0xFF
    dst.buffer(0)[0, 0, 0] = 0  # token 0 is not a destination
    problems = verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY)
    assert len(problems) == 1 and "outside the destination" in problems[0]
    assert verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY, ignore_tokens=np.array([0])) == []


def test_hisparse_tokens_cut_to_length(pools: list[HostPool]) -> None:
    src = prefill_pools(pools, tp=2, page_size=4)
    lay = layout("decode", 1, 0, hisparse=True)
    assert lay.page_size == 1 and lay.num_tokens == 32
    dst = HostPool.create(lay)
    pools.append(dst)
    fill_canary(dst, CANARY)
    plan = RoomPlan(room=1, src_pages=[2, 3], dst_pages=[30, 1, 17, 4, 9, 22], length=6)
    src_tok, dst_tok = plan.tokens(4, hisparse=True)
    assert src_tok.tolist() == [8, 9, 10, 11, 12, 13] and dst_tok.tolist() == [30, 1, 17, 4, 9, 22]
    transfer(src, dst, src_tok, dst_tok)
    assert verify_decode(dst, lay, src_tok, dst_tok, 3, CANARY) == []


def test_plan_errors_are_reported(pools: list[HostPool]) -> None:
    lay = layout("decode", 1, 0)
    dst = HostPool.create(lay)
    pools.append(dst)
    assert "plan error" in verify_decode(dst, lay, np.arange(3), np.arange(2), 1, 0)[0]
    assert "plan error" in verify_decode(dst, lay, np.arange(2), np.array([1, 1]), 1, 0)[0]
    assert "plan error" in verify_decode(dst, lay, np.arange(1), np.array([10**6]), 1, 0)[0]


# --- the fake engine ranks against a copying fake daemon -------------------------------------------

class CopyingKvd(ThreadedEngineServer):
    """Just enough of kvd for the fake engines: maps registered shm pools and, once every
    prefill rank sent a room's last chunk and the decode rank asked for it, copies the heads."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.pools: dict[int, tuple[PoolLayout, np.ndarray, list[int], Any]] = {}
        self.sent: dict[tuple[str, int], dict[int, tuple[list[int], bytes, Any, bool]]] = {}
        self.wanted: dict[tuple[int, int], tuple[list[int], str, Any]] = {}

    def handle(self, msg: Any, writer: asyncio.StreamWriter) -> bool:
        self._handle(msg, writer)
        return True

    def _handle(self, msg: Any, writer: asyncio.StreamWriter) -> None:
        def out(m: p.Message, w: asyncio.StreamWriter = writer) -> None:
            w.write(p.frame(p.encode(m)))

        if isinstance(msg, p.RegisterPool):
            lay = PoolLayout.from_dict(msg.layout)
            fd = self.fds.pop(msg.memory["ticket"])
            mem = np.frombuffer(mmap.mmap(fd, 0), dtype=np.uint8)
            os.close(fd)
            pool_id = len(self.pools) + 1
            self.pools[pool_id] = (lay, mem, msg.memory["offsets"], out)
            out(p.PoolRegistered(req_id=msg.req_id, pool_id=pool_id))
            return
        out(p.Ok(req_id=msg.req_id))
        if isinstance(msg, p.SendChunk):
            lay = self.pools[msg.pool_id][0]
            ranks = self.sent.setdefault((lay.engine_id, msg.room), {})
            pages = ranks.get(msg.pool_id, ([], b"", out, False))[0] + msg.pages.tolist()
            ranks[msg.pool_id] = (pages, msg.aux, out, msg.is_last)
        elif isinstance(msg, p.RecvRoom):
            self.wanted[msg.pool_id, msg.room] = (msg.pages.tolist(), msg.prefill_engine_id, out)
        self._try_copy()

    def _view(self, pool_id: int, b: int) -> np.ndarray:
        lay, mem, offsets, _ = self.pools[pool_id]
        return mem[offsets[b]:offsets[b] + lay.buffer_bytes].reshape(lay.num_tokens, lay.local_heads, -1)

    def _try_copy(self) -> None:
        for (dpool, room), (dpages, engine, dout) in list(self.wanted.items()):
            ranks = self.sent.get((engine, room), {})
            done = [pid for pid, sent in ranks.items() if sent[3]]
            if not done or len(done) < self.pools[done[0]][0].tp_size:
                continue
            dl = self.pools[dpool][0]
            aux = b""
            for j, g in enumerate(dl.head_range()):
                spool = next(pid for pid in ranks if g in self.pools[pid][0].head_range())
                sl = self.pools[spool][0]
                src_tok = pages_to_tokens(ranks[spool][0], sl.page_size)
                dst_tok = np.asarray(dpages) if dl.hisparse else pages_to_tokens(dpages, dl.page_size)
                src_tok = src_tok[:len(dst_tok)]
                jj = list(sl.head_range()).index(g)
                for b in range(dl.num_buffers):
                    self._view(dpool, b)[dst_tok, j] = self._view(spool, b)[src_tok, jj]
                aux = ranks[spool][1]
            dout(p.RoomEvent(req_id=0, room=room, state="success", aux=aux, released=True))
            for *_, sout, _last in ranks.values():
                sout(p.RoomEvent(req_id=0, room=room, state="success", released=True))
            del self.wanted[dpool, room]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
@pytest.mark.parametrize("p_tp, d_tp, heads, hisparse", [(2, 1, 4, False), (1, 2, 2, False),
                                                         (2, 1, 4, True)])
def test_fake_engine_ranks_round_trip(p_tp: int, d_tp: int, heads: int, hisparse: bool) -> None:
    path = f"/tmp/kvd-copy-{os.getpid()}-{p_tp}{d_tp}{int(hisparse)}.sock"
    rng = np.random.default_rng(0)
    src_pages = rng.permutation(8)[:6].reshape(3, 2).tolist()
    if hisparse:
        dst = rng.permutation(32)[:21].reshape(3, 7).tolist()
        plan = [RoomPlan(100 + i, src_pages[i], dst[i], length=7) for i in range(3)]
    else:
        dst = rng.permutation(8)[:6].reshape(3, 2).tolist()
        plan = [RoomPlan(100 + i, src_pages[i], dst[i]) for i in range(3)]
    reports: list[Any] = []
    with CopyingKvd(path):
        def prefill(r: int) -> None:
            reports.append(run_prefill_rank(path, layout("prefill", p_tp, r, heads), plan, seed=9,
                                            chunk_pages=1, timeout=10))

        def decode(r: int) -> None:
            reports.append(run_decode_rank(path, layout("decode", d_tp, r, heads, hisparse=hisparse),
                                           plan, "tcp://127.0.0.1:1", "prefill-eng", 4, seed=9,
                                           canary=CANARY, timeout=10))

        threads = [threading.Thread(target=prefill, args=(r,)) for r in range(p_tp)]
        threads += [threading.Thread(target=decode, args=(r,)) for r in range(d_tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    os.unlink(path)
    assert len(reports) == p_tp + d_tp
    for rep in reports:
        assert rep.ok, rep.to_json()
        assert rep.rooms_ok == 3
    dec = [r for r in reports if r.role == "decode"]
    lay = layout("decode", d_tp, 0, heads)
    tokens = 21 if hisparse else 24
    assert all(r.bytes == tokens * lay.token_bytes * lay.num_buffers for r in dec)
