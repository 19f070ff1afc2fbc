"""A wide, byte-exact sweep of shapes and paths over the in-process pair (tests/sides/sweepkit.py).

Every valid (prefill TP, decode TP, KV heads) of TP sizes 1, 2, 3, 4, 6, 8 and KV heads 1, 2, 3, 4,
6, 8, 16 or MLA, each on the direct, inline, HiSparse and staged paths, with page sizes, room
lengths (one token, one page, a page and a token, ...), uneven and empty chunks, dtypes of 1, 2
and 4 bytes, layers and head sizes drawn from a seeded generator; then cases with several engines
of different shapes and several rooms at once, ranks spread over several daemons, the prefill
engine finishing before the decode engine asks, small staging pools and chunks. The expected
pools are computed with numpy from the model's global KV, not with kvd's own head mapping.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from tests.sides.sweepkit import ITEM_DTYPE, Engines, run_case

TPS = (1, 2, 3, 4, 6, 8)
HEADS: tuple[int | str, ...] = (1, 2, 3, 4, 6, 8, 16, "mla")
PATHS = ("direct", "inline", "hisparse", "staged")


def _fits(heads: int, tp: int) -> bool:
    return heads % tp == 0 if heads >= tp else tp % heads == 0


COMBOS = [(p, d, h) for p, d in itertools.product(TPS, TPS) if max(p, d) % min(p, d) == 0 for h in HEADS
          if _fits(1 if h == "mla" else h, p) and _fits(1 if h == "mla" else h, d)]


def _chunks(rng: random.Random, pages: int) -> list[int]:
    """Uneven chunks; sometimes a last chunk of one page, sometimes an empty one somewhere."""
    cuts = set(rng.sample(range(1, pages), min(pages - 1, rng.choice([0, 1, 2, 4])))) if pages > 1 else set()
    if pages > 1 and rng.random() < 0.3:
        cuts.add(pages - 1)
    edges = [0, *sorted(cuts), pages]
    chunks = [b - a for a, b in itertools.pairwise(edges)]
    if rng.random() < 0.2:
        chunks.insert(rng.randint(0, len(chunks)), 0)
    return chunks


def _room(rng: random.Random, page: int) -> dict[str, Any]:
    tokens = rng.choice([1, page, page + 1, 2 * page - 1, 3 * page, rng.randint(1, 20 * page)])
    return {"tokens": tokens, "chunks": _chunks(rng, -(-tokens // page)), "contiguous": rng.random() < 0.3}


def _engines(rng: random.Random, name: str, p: int, d: int, h: int | str, hisparse: bool,
             rooms: int) -> tuple[Engines, list[dict[str, Any]]]:
    page = rng.choice([1, 4, 16, 64])
    specs = [_room(rng, page) for _ in range(rooms)]
    pages = sum(-(-s["tokens"] // page) for s in specs)
    return Engines(name, p, d, kv_heads=1 if h == "mla" else int(h), mla=h == "mla", page_size=page,
                   dtype=ITEM_DTYPE[rng.choice([1, 2, 4])], layers=rng.choice([1, 2, 3]),
                   head_dim=rng.choice([1, 2, 8, 16]), num_pages=pages + rng.randint(1, 4),
                   hisparse=hisparse, seed=rng.randrange(1 << 30)), specs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"), COMBOS,
                         ids=[f"p{p}-d{d}-h{h}" for p, d, h in COMBOS])
async def test_every_tp_pair_and_path_is_byte_exact(prefill_tp, decode_tp, kv_heads, path):
    rng = random.Random(f"{prefill_tp}/{decode_tp}/{kv_heads}/{path}")
    eng, specs = _engines(rng, "e", prefill_tp, decode_tp, kv_heads, path == "hisparse", rng.choice([1, 2]))
    problems, cluster = await run_case(
        [eng], [specs], staged=path == "staged", inline=(1 << 20) if path == "inline" else 0,
        stepwise=rng.random() < 0.3, config={"staging_chunk_tokens": rng.choice([3, 16, 64])})
    assert problems == [], (eng, specs)
    if path == "staged" and kv_heads != "mla" and prefill_tp != decode_tp:
        assert set(p.value for n in cluster.nodes.values() for p in n.receivers.paths) == {"staged"}


@pytest.mark.parametrize("seed", range(40))
async def test_mixed_engines_rooms_and_daemons_are_byte_exact(seed):
    rng = random.Random(seed)
    staged = rng.random() < 0.5
    engines, specs = [], []
    for e in range(rng.choice([1, 2, 3])):
        p, d, h = rng.choice(COMBOS)
        eng, rooms = _engines(rng, f"e{e}", p, d, h, rng.random() < 0.25, rng.choice([1, 2, 3]))
        engines.append(eng)
        specs.append(rooms)
    config = {"staging_chunk_tokens": rng.choice([1, 3, 16, 100]),
              "staging_prefetch_chunks": rng.choice([1, 2, 4])}
    if staged and rng.random() < 0.3:  # fragmented same-TP rooms staged too
        config |= {"staging_same_tp_run_bytes": 256 << 10, "staging_same_tp_min_bytes": 1}
    problems, _ = await run_case(
        engines, specs, staged=staged, inline=rng.choice([0, 0, 300, 4096, 1 << 20]), config=config,
        stage_bytes=rng.choice([8 << 20, 64 << 10, 16 << 10]), stepwise=rng.random() < 0.3,
        one_pass=rng.random() < 0.2, nodes=(rng.choice([1, 2, 3]), rng.choice([1, 2, 3])),
        send_first=rng.random() < 0.3, patience_s=20)
    assert problems == [], (engines, specs)
