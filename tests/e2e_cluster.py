"""Run one transfer between real daemons with fake engine ranks as separate processes.

Shared by the end-to-end tests: every prefill rank and every decode rank is its own
process (tools/fake_engine.py's run_*_rank), talking to a real kvd over its socket;
the daemons move the bytes with Mooncake over loopback TCP.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.fake_engine import RoomPlan, build_layout, run_decode_rank, run_prefill_rank  # noqa: E402


def _prefill(q, sock, layout, rooms, bootstrap, chunk_pages):
    r = run_prefill_rank(sock, layout, rooms, seed=7, chunk_pages=chunk_pages, bootstrap=bootstrap,
                         timeout=60)
    q.put(r)


def _decode(q, sock, layout, rooms, bootstrap, prefill_page_size):
    r = run_decode_rank(sock, layout, rooms, bootstrap, "P", prefill_page_size, seed=7, timeout=60)
    q.put(r)


def make_plan(rooms: int, pages_per_room: int, src_pages: int, dst_pages: int, seed: int = 0,
              length_cut: bool = False, page_size: int = 1) -> list[RoomPlan]:
    """Random, non-overlapping page choices on both sides (so untouched pages are checked too)."""
    rng = random.Random(seed)
    src = rng.sample(range(src_pages), rooms * pages_per_room)
    dst = rng.sample(range(dst_pages), rooms * pages_per_room)
    plans = []
    for i in range(rooms):
        s = src[i * pages_per_room:(i + 1) * pages_per_room]
        d = dst[i * pages_per_room:(i + 1) * pages_per_room]
        length = None
        if length_cut:  # HiSparse: the request ends mid-page; dst are token indices
            length = (pages_per_room - 1) * page_size + rng.randint(1, page_size)
        plans.append(RoomPlan(room=1000 + i, src_pages=s, dst_pages=d, length=length))
    return plans


def hisparse_plan(rooms: int, pages_per_room: int, src_pages: int, page_size: int, dst_tokens: int,
                  seed: int = 0) -> list[RoomPlan]:
    rng = random.Random(seed)
    src = rng.sample(range(src_pages), rooms * pages_per_room)
    plans = []
    free = rng.sample(range(dst_tokens), rooms * pages_per_room * page_size)
    for i in range(rooms):
        length = (pages_per_room - 1) * page_size + rng.randint(1, page_size)
        d = free[i * pages_per_room * page_size:][:length]
        plans.append(RoomPlan(room=2000 + i, src_pages=src[i * pages_per_room:(i + 1) * pages_per_room],
                              dst_pages=d, length=length))
    return plans


def run_cluster(prefill, decode, *, prefill_tp: int, decode_tp: int, kv_heads: int = 8,
                layers: int = 2, head_dim: int = 16, page_size: int = 4, num_pages: int = 64,
                rooms: int = 3, pages_per_room: int = 5, mla: bool = False, hisparse: bool = False,
                chunk_pages: int = 2, dtype: str = "bfloat16") -> list:
    """Run a whole transfer; returns every rank's RankReport (asserting is the caller's job).

    ``prefill`` may be a list of daemons: prefill rank r registers with daemon r % len, and
    the first daemon is the engine's directory (a prefill engine spread over several nodes).
    """
    prefills = prefill if isinstance(prefill, list | tuple) else [prefill]
    prefill = prefills[0]
    if hisparse:
        plan = hisparse_plan(rooms, pages_per_room, num_pages, page_size, num_pages * page_size)
    else:
        plan = make_plan(rooms, pages_per_room, num_pages, num_pages)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = []
    for r in range(prefill_tp):
        lay = build_layout("prefill", "P", prefill_tp, r, layers, kv_heads, head_dim, dtype, page_size,
                           num_pages, mla=mla)
        home = prefills[r % len(prefills)]
        procs.append(ctx.Process(target=_prefill, args=(q, home.socket_path, lay, plan, prefill.address,
                                                        chunk_pages)))
    for r in range(decode_tp):
        lay = build_layout("decode", "D", decode_tp, r, layers, kv_heads, head_dim, dtype, page_size,
                           num_pages, mla=mla, hisparse=hisparse)
        procs.append(ctx.Process(target=_decode, args=(q, decode.socket_path, lay, plan, prefill.address,
                                                       page_size)))
    for proc in procs:
        proc.start()
    reports = [q.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    return reports
