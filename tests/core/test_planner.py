"""Tests of kvd.planner: TP head mapping tables, mapping properties, and write ops that move bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.layout import PoolLayout
from kvd.planner import (
    HeadSlice,
    PlanError,
    WriteOps,
    check_ops_within,
    check_ranges_within,
    check_token_indices,
    expand_pages_to_tokens,
    head_range,
    map_heads,
    map_layouts,
    pages_to_tokens,
    plan_direct_writes,
    plan_pair_writes,
)

PROPS = settings(max_examples=200, deadline=None)


def _valid(total: int, tp: int) -> bool:
    return total % tp == 0 if total >= tp else tp % total == 0


def _combo_ok(total: int, stp: int, rtp: int) -> bool:
    """Each side's heads divide evenly over its ranks (or its ranks over the heads); the two TP
    sizes need not divide each other (6 heads, TP 2 -> 3 and 3 -> 2 map head by head)."""
    return _valid(total, stp) and _valid(total, rtp)


GRID = range(1, 17)
VALID = [(h, s, r) for h in (1, 2, 3, 4, 6, 8, 12, 16, 32) for s in GRID for r in GRID
         if _combo_ok(h, s, r)]


def layout(role: str, tp: int, rank: int, heads: int, *, layers: int = 2, head_dim: int = 2,
           dtype: str = "uint8", page_size: int = 2, num_pages: int = 4, mla: bool = False,
           hisparse: bool = False) -> PoolLayout:
    return PoolLayout(engine_id=role[0], role=role, tp_size=tp, tp_rank=rank, num_layers=layers,
                      total_kv_heads=heads, head_dim=head_dim, dtype=dtype, page_size=page_size,
                      num_pages=num_pages, is_mla=mla, hisparse=hisparse)


# --- mapping tables ---------------------------------------------------------------------------

# (total heads, sender tp, receiver tp, required senders per receiver, notified senders per receiver)
TABLE = [
    pytest.param(8, 1, 2, [(0,), (0,)], [(0,), (0,)], id="mha 1->2"),
    pytest.param(8, 2, 1, [(0, 1)], [(0, 1)], id="mha 2->1"),
    pytest.param(8, 4, 1, [(0, 1, 2, 3)], [(0, 1, 2, 3)], id="mha 4->1"),
    pytest.param(8, 1, 4, [(0,)] * 4, [(0,)] * 4, id="mha 1->4"),
    pytest.param(8, 2, 4, [(0,), (0,), (1,), (1,)], [(0,), (0,), (1,), (1,)], id="mha 2->4"),
    pytest.param(8, 4, 2, [(0, 1), (2, 3)], [(0, 1), (2, 3)], id="mha 4->2"),
    pytest.param(8, 8, 2, [(0, 1, 2, 3), (4, 5, 6, 7)], [(0, 1, 2, 3), (4, 5, 6, 7)], id="mha 8->2"),
    pytest.param(8, 8, 8, [(r,) for r in range(8)], [(r,) for r in range(8)], id="mha 8->8"),
    pytest.param(8, 2, 8, [(r // 4,) for r in range(8)], [(r // 4,) for r in range(8)], id="mha 2->8"),
    pytest.param(2, 4, 2, [(0,), (2,)], [(0, 1), (2, 3)], id="gqa2 4->2"),
    pytest.param(2, 2, 4, [(0,), (0,), (1,), (1,)], [(0,), (0,), (1,), (1,)], id="gqa2 2->4"),
    pytest.param(2, 4, 4, [(0,), (1,), (2,), (3,)], [(0,), (1,), (2,), (3,)], id="gqa2 4->4"),
    pytest.param(2, 8, 2, [(0,), (4,)], [(0, 1, 2, 3), (4, 5, 6, 7)], id="gqa2 8->2"),
    pytest.param(2, 4, 1, [(0, 2)], [(0, 1, 2, 3)], id="gqa2 4->1"),
    pytest.param(1, 2, 4, [(0,), (0,), (1,), (1,)], [(0,), (0,), (1,), (1,)], id="mla 2->4"),
    pytest.param(1, 4, 1, [(0,)], [(0, 1, 2, 3)], id="mla 4->1"),
    pytest.param(1, 1, 1, [(0,)], [(0,)], id="mla 1->1"),
]


@pytest.mark.parametrize(("total", "stp", "rtp", "required", "notified"), TABLE)
def test_mapping_table(total: int, stp: int, rtp: int, required: list[tuple[int, ...]],
                       notified: list[tuple[int, ...]]) -> None:
    m = map_heads(total, stp, rtp)
    assert [m.required_senders(r) for r in range(rtp)] == required
    assert [m.notified_senders(r) for r in range(rtp)] == notified
    for r in range(rtp):
        assert set(m.dummy_senders(r)) == set(notified[r]) - set(required[r])
    for s in range(stp):
        assert m.receivers_of(s) == tuple(r for r in range(rtp) if s in notified[r])


def test_slices_mha_4_to_2() -> None:
    m = map_heads(8, 4, 2)
    assert m.slices_for(0) == (HeadSlice(0, 0, 0, 0, 0, 2), HeadSlice(1, 0, 2, 0, 2, 2))
    assert m.slices_for(1) == (HeadSlice(2, 1, 4, 0, 0, 2), HeadSlice(3, 1, 6, 0, 2, 2))
    assert m.slices_between(1, 0) == (HeadSlice(1, 0, 2, 0, 2, 2),)
    assert m.slices_between(2, 0) == ()


def test_slices_mha_1_to_2_and_gqa_dummy() -> None:
    m = map_heads(8, 1, 2)
    assert m.slices_for(1) == (HeadSlice(0, 1, 4, 4, 0, 4),)
    g = map_heads(2, 8, 2)
    assert g.slices_for(1) == (HeadSlice(4, 1, 1, 0, 0, 1),)
    assert g.slices_between(5, 1) == ()  # dummy: notified, nothing to write
    assert g.receivers_of(5) == (1,)


def test_mla_one_sender_per_receiver() -> None:
    for stp, rtp in [(2, 4), (4, 1), (1, 8), (8, 8), (8, 2)]:
        m = map_heads(1, stp, rtp)
        for r in range(rtp):
            (hs,) = m.slices_for(r)
            assert (hs.global_head_start, hs.src_head_offset, hs.dst_head_offset, hs.num_heads) == (0, 0, 0, 1)


@pytest.mark.parametrize(("total", "stp", "rtp"), [(8, 3, 2), (8, 2, 3), (6, 4, 2), (3, 2, 1), (4, 8, 6),
                                                   (0, 1, 1), (8, 0, 1), (8, 1, -2), (True, 1, 1)])
def test_map_heads_refuses(total: int, stp: int, rtp: int) -> None:
    with pytest.raises(PlanError):
        map_heads(total, stp, rtp)


def test_map_heads_refuses_exactly_the_invalid_grid() -> None:
    for h in range(1, 17):
        for s in GRID:
            for r in GRID:
                if _combo_ok(h, s, r):
                    map_heads(h, s, r)
                else:
                    with pytest.raises(PlanError):
                        map_heads(h, s, r)


def test_rank_queries_out_of_range() -> None:
    m = map_heads(8, 2, 4)
    for call in (lambda: m.slices_for(4), lambda: m.notified_senders(-1),
                 lambda: m.receivers_of(2), lambda: m.slices_between(2, 0)):
        with pytest.raises(PlanError):
            call()


def test_head_range_matches_layout() -> None:
    for h, s, _ in VALID:
        for rank in range(s):
            assert head_range(h, s, rank) == layout("prefill", s, rank, h).head_range()


def test_map_layouts_checks_compatibility() -> None:
    s, r = layout("prefill", 4, 0, 8), layout("decode", 2, 0, 8)
    assert map_layouts(s, r) is map_heads(8, 4, 2)
    with pytest.raises(PlanError, match="head_dim"):
        map_layouts(s, layout("decode", 2, 0, 8, head_dim=4))


# --- mapping properties -----------------------------------------------------------------------


def _check_mapping(total: int, stp: int, rtp: int) -> None:
    m = map_heads(total, stp, rtp)
    for r in range(rtp):
        needed = head_range(total, rtp, r)
        # the group holds every head the receiver needs (the proof, checked)
        group_heads = set().union(*(head_range(total, stp, s) for s in m.notified_senders(r)))
        assert set(needed) <= group_heads
        covered: list[int] = []
        for hs in m.slices_for(r):
            assert hs.receiver_rank == r
            assert hs.sender_rank in m.notified_senders(r)
            src_heads = head_range(total, stp, hs.sender_rank)
            assert set(hs.heads) <= set(src_heads)
            assert hs.global_head_start == src_heads.start + hs.src_head_offset
            assert hs.global_head_start == needed.start + hs.dst_head_offset
            covered.extend(hs.heads)
        assert sorted(covered) == list(needed)  # every (receiver rank, head) exactly once
        assert m.required_senders(r) == tuple(sorted({hs.sender_rank for hs in m.slices_for(r)}))
        assert len(m.slices_for(r)) == len(m.required_senders(r))  # merged: one slice per pair
        assert set(m.required_senders(r)) <= set(m.notified_senders(r))
        if stp <= rtp:
            assert m.required_senders(r) == m.notified_senders(r)
        if total == 1:
            assert len(m.required_senders(r)) == 1
    for s in range(stp):
        assert m.receivers_of(s), f"sender {s} would never hear of a room"
        assert m.receivers_of(s) == tuple(r for r in range(rtp) if s in m.notified_senders(r))


def test_mapping_properties_exhaustive() -> None:
    for combo in VALID:
        _check_mapping(*combo)


@PROPS
@given(st.sampled_from(VALID))
def test_mapping_properties(combo: tuple[int, int, int]) -> None:
    _check_mapping(*combo)


# --- pages and tokens -------------------------------------------------------------------------


def test_pages_to_tokens() -> None:
    assert pages_to_tokens(np.array([3, 0]), 2).tolist() == [6, 7, 0, 1]
    assert pages_to_tokens(np.array([], dtype=np.int32), 4).tolist() == []
    assert pages_to_tokens([5], 1).tolist() == [5]
    for bad_pages, size in (([-1], 2), ([1.0], 2), ([[1]], 2), ([2**62], 4), ([1], 0)):
        with pytest.raises(PlanError):
            pages_to_tokens(np.array(bad_pages), size)


def test_expand_pages_to_tokens_edges() -> None:
    pages = np.array([4, 1, 7])
    assert expand_pages_to_tokens(pages, 4, 12).tolist() == [16, 17, 18, 19, 4, 5, 6, 7, 28, 29, 30, 31]
    assert expand_pages_to_tokens(pages, 4, 9).tolist() == [16, 17, 18, 19, 4, 5, 6, 7, 28]
    assert expand_pages_to_tokens(np.array([2]), 1, 1).tolist() == [2]
    for length in (13, 8, 0, -1):
        with pytest.raises(PlanError):
            expand_pages_to_tokens(pages, 4, length)
    with pytest.raises(PlanError):
        expand_pages_to_tokens(np.array([], dtype=np.int64), 4, 1)


def test_check_token_indices() -> None:
    lay = layout("decode", 1, 0, 2, page_size=2, num_pages=4)
    check_token_indices(np.array([0, 7]), lay, "dst tokens")
    check_token_indices(np.array([], dtype=np.float64), lay, "dst tokens")
    check_token_indices(np.array([3], dtype=np.uint8), lay, "dst tokens")
    for bad in ([8], [-1], [1.0], [2**63]):
        with pytest.raises(PlanError, match="room 7 dst"):
            check_token_indices(np.array(bad), lay, "room 7 dst")


# --- write ops --------------------------------------------------------------------------------


def test_same_tp_merges_consecutive_pages() -> None:
    s, r = layout("prefill", 2, 1, 8, layers=3, page_size=4, num_pages=16), \
        layout("decode", 2, 1, 8, layers=3, page_size=4, num_pages=16)
    (hs,) = map_heads(8, 2, 2).slices_for(1)
    sbufs = [10_000 * (i + 1) for i in range(6)]
    rbufs = [1_000_000 + 10_000 * i for i in range(6)]
    ops = plan_direct_writes(s, sbufs, pages_to_tokens(np.array([3, 4, 5]), 4),
                             r, rbufs, pages_to_tokens(np.array([7, 8, 9]), 4), hs)
    assert len(ops) == 6
    assert ops.length.tolist() == [12 * s.token_bytes] * 6
    assert ops.src.tolist() == [b + 12 * s.token_bytes for b in sbufs]
    assert ops.dst.tolist() == [b + 28 * r.token_bytes for b in rbufs]
    split = plan_direct_writes(s, sbufs, pages_to_tokens(np.array([3, 4, 6]), 4),
                               r, rbufs, pages_to_tokens(np.array([7, 8, 9]), 4), hs)
    assert len(split) == 12 and split.total_bytes == ops.total_bytes


def test_hetero_tp_one_op_per_token() -> None:
    s, r = layout("prefill", 4, 1, 8, page_size=4, num_pages=8), layout("decode", 2, 0, 8, page_size=4,
                                                                        num_pages=8)
    (hs,) = map_heads(8, 4, 2).slices_between(1, 0)
    toks = pages_to_tokens(np.array([0, 1]), 4)
    ops = plan_direct_writes(s, [0, 1000, 2000, 3000], toks, r, [0, 10**6, 2 * 10**6, 3 * 10**6], toks, hs)
    assert len(ops) == 4 * 8
    assert set(ops.length.tolist()) == {2 * s.head_bytes}
    assert ops.dst[:2].tolist() == [2 * r.head_bytes, r.token_bytes + 2 * r.head_bytes]


def _bench_layouts() -> tuple[PoolLayout, PoolLayout]:
    return (layout("prefill", 4, 1, 8, layers=32, head_dim=128, dtype="bfloat16", page_size=64,
                   num_pages=1024),
            layout("decode", 2, 0, 8, layers=32, head_dim=128, dtype="bfloat16", page_size=64,
                   num_pages=1024))


def test_benchmark_shape_plans_fast() -> None:
    s, r = _bench_layouts()
    (hs,) = map_heads(8, 4, 2).slices_between(1, 0)
    rng = np.random.default_rng(0)
    src = pages_to_tokens(rng.permutation(1024)[:64], 64)
    dst = pages_to_tokens(rng.permutation(1024)[:64], 64)
    sbufs = [i * s.buffer_bytes for i in range(64)]
    rbufs = [2**40 + i * r.buffer_bytes for i in range(64)]
    start = time.perf_counter()
    ops = plan_direct_writes(s, sbufs, src, r, rbufs, dst, hs)
    check_ops_within(ops, [(b, r.buffer_bytes) for b in rbufs], "dst")
    check_ops_within(ops, [(b, s.buffer_bytes) for b in sbufs], "src", side="src")
    elapsed = time.perf_counter() - start
    assert len(ops) == 32 * 2 * 4096
    assert elapsed < 1.0, elapsed


def test_plan_direct_writes_refuses() -> None:
    s, r = layout("prefill", 2, 0, 4), layout("decode", 1, 0, 4)
    (hs,) = map_heads(4, 2, 1).slices_between(0, 0)
    bufs = [0, 100, 200, 300]
    ok = np.array([0, 1])
    plan_direct_writes(s, bufs, ok, r, bufs, ok, hs)
    cases = [
        (dict(src_tokens=np.array([0])), "src tokens"),
        (dict(src_tokens=np.array([0, 8])), "src tokens"),
        (dict(dst_tokens=np.array([-1, 0])), "dst tokens"),
        (dict(dst_tokens=np.array([1.0, 2.0])), "dst tokens"),
        (dict(dst_tokens=np.array([3, 3])), "repeat"),
        (dict(sender_buffers=bufs[:3]), "sender buffers"),
        (dict(receiver_buffers=[0, 1, 2, -3]), "receiver buffers"),
        (dict(head_slice=map_heads(4, 2, 1).slices_between(1, 0)[0]), "ranks"),
        (dict(head_slice=HeadSlice(0, 0, 0, 0, 0, 3)), "local heads"),
        (dict(head_slice=HeadSlice(0, 0, 2, 1, 1, 1)), "sender's heads"),
        (dict(head_slice=HeadSlice(0, 0, 1, 1, 2, 1)), "receiver's heads"),
        (dict(receiver=layout("decode", 1, 0, 4, head_dim=3)), "head_dim"),
    ]
    base = dict(sender=s, sender_buffers=bufs, src_tokens=ok, receiver=r, receiver_buffers=bufs,
                dst_tokens=ok, head_slice=hs)
    for change, message in cases:
        with pytest.raises(PlanError, match=message):
            plan_direct_writes(**{**base, **change})  # type: ignore[arg-type]


def test_check_ranges_within() -> None:
    regions = [(100, 50), (0, 10), (120, 100)]  # unsorted, overlapping
    check_ranges_within(np.array([0, 100, 140, 219]), np.array([10, 50, 80, 1]), regions, "x")
    check_ranges_within(np.array([], dtype=np.int64), np.array([], dtype=np.int64), [], "x")
    for addr, length in ((5, 6), (10, 1), (219, 2), (95, 10), (-1, 1), (0, 0)):
        with pytest.raises(PlanError, match="room 3"):
            check_ranges_within(np.array([addr]), np.array([length]), regions, "room 3")
    with pytest.raises(PlanError):
        check_ranges_within(np.array([0]), np.array([1]), [], "x")
    with pytest.raises(PlanError):
        check_ranges_within(np.array([0]), np.array([1]), [(0, 0)], "x")


def test_write_ops_concat_and_len() -> None:
    a = WriteOps(np.array([1, 2]), np.array([3, 4]), np.array([5, 6]))
    b = WriteOps(np.array([7]), np.array([8]), np.array([9]))
    c = WriteOps.concat([a, WriteOps.empty(), b])
    assert len(c) == 3 and c.total_bytes == 20 and c.src.dtype == np.int64
    assert len(WriteOps.concat([])) == 0
    with pytest.raises(PlanError):
        WriteOps(np.array([1]), np.array([1, 2]), np.array([1]))


# --- byte-moving property test ----------------------------------------------------------------


@dataclass
class Scenario:
    total: int
    stp: int
    rtp: int
    mla: bool
    layers: int
    head_dim: int
    dtype: str
    page_size: int
    hisparse: bool
    src_pages: int
    dst_tokens_pool: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    small = [c for c in VALID if c[0] <= 8 and c[1] <= 8 and c[2] <= 8]
    mla = draw(st.booleans())
    if mla:
        total, stp, rtp = draw(st.sampled_from([c for c in small if c[0] == 1]))
    else:
        total, stp, rtp = draw(st.sampled_from(small))
    return Scenario(total, stp, rtp, mla, layers=draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 4)),
                    dtype=draw(st.sampled_from(["uint8", "float16", "float32"])),
                    page_size=draw(st.integers(1, 4)), hisparse=draw(st.booleans()),
                    src_pages=draw(st.integers(1, 5)), dst_tokens_pool=draw(st.integers(0, 6)))


@PROPS
@given(sc=scenarios(), data=st.data())
def test_direct_writes_move_the_right_bytes(sc: Scenario, data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kv = 1 if sc.mla else 2
    nbuf = sc.layers * kv
    senders = [layout("prefill", sc.stp, s, sc.total, layers=sc.layers, head_dim=sc.head_dim, dtype=sc.dtype,
                      page_size=sc.page_size, num_pages=sc.src_pages, mla=sc.mla) for s in range(sc.stp)]
    item = senders[0].itemsize
    src_tokens_total = sc.src_pages * sc.page_size
    # the request: some sender pages, the real length cutting the last page
    npages = data.draw(st.integers(1, sc.src_pages))
    length = data.draw(st.integers((npages - 1) * sc.page_size + 1, npages * sc.page_size))
    src_page_ids = rng.permutation(sc.src_pages)[:npages]
    if data.draw(st.booleans()):
        src_page_ids = np.sort(src_page_ids)  # consecutive pages exercise the merge path
    src_tok = expand_pages_to_tokens(src_page_ids, sc.page_size, length)
    if sc.hisparse:  # decode keeps a host pool of page size 1, written token by token
        rpage, rpages = 1, length + sc.dst_tokens_pool
        dst_tok = rng.permutation(rpages)[:length]
        if data.draw(st.booleans()):
            dst_tok = np.sort(dst_tok)
    else:
        rpage, rpages = sc.page_size, npages + sc.dst_tokens_pool // sc.page_size
        dst_page_ids = rng.permutation(rpages)[:npages]
        if data.draw(st.booleans()):
            dst_page_ids = np.sort(dst_page_ids)
        dst_tok = expand_pages_to_tokens(dst_page_ids, sc.page_size, length)
    receivers = [layout("decode", sc.rtp, r, sc.total, layers=sc.layers, head_dim=sc.head_dim, dtype=sc.dtype,
                        page_size=rpage, num_pages=rpages, mla=sc.mla, hisparse=sc.hisparse)
                 for r in range(sc.rtp)]

    # one flat "memory": every rank's buffers at offsets, with a gap between buffers
    hb = sc.head_dim * item
    glob = rng.integers(0, 256, size=(sc.layers, kv, src_tokens_total, sc.total, hb), dtype=np.uint8)
    cursor = 7
    sbufs: list[list[int]] = []
    for lay in senders:
        sbufs.append([cursor + b * (lay.buffer_bytes + 3) for b in range(nbuf)])
        cursor += nbuf * (lay.buffer_bytes + 3)
    rbufs: list[list[int]] = []
    for lay in receivers:
        rbufs.append([cursor + b * (lay.buffer_bytes + 5) for b in range(nbuf)])
        cursor += nbuf * (lay.buffer_bytes + 5)
    mem = rng.integers(0, 256, size=cursor + 11, dtype=np.uint8)
    for s, lay in enumerate(senders):
        heads = lay.head_range()
        for b in range(nbuf):
            block = glob[b % sc.layers, b // sc.layers][:, heads.start:heads.stop].reshape(-1)
            mem[sbufs[s][b]:sbufs[s][b] + lay.buffer_bytes] = block
    expected = mem.copy()
    for r, lay in enumerate(receivers):
        heads = lay.head_range()
        for b in range(nbuf):
            pool = expected[rbufs[r][b]:rbufs[r][b] + lay.buffer_bytes].reshape(rpage * rpages, -1)
            pool[dst_tok] = glob[b % sc.layers, b // sc.layers][src_tok, heads.start:heads.stop].reshape(
                length, -1)

    mapping = map_heads(sc.total, sc.stp, sc.rtp)
    written = np.zeros_like(mem, dtype=np.int32)
    all_ops = []
    for r, rlay in enumerate(receivers):
        rregions = [(a, rlay.buffer_bytes) for a in rbufs[r]]
        for s in mapping.notified_senders(r):
            ops = plan_pair_writes(mapping, senders[s], sbufs[s], src_tok, rlay, rbufs[r], dst_tok)
            assert (len(ops) == 0) == (s not in mapping.required_senders(r))
            check_ops_within(ops, rregions, "dst")
            check_ops_within(ops, [(a, senders[s].buffer_bytes) for a in sbufs[s]], "src", side="src")
            if len(ops):
                all_ops.append((ops, rregions))
            for src, dst, n in zip(ops.src.tolist(), ops.dst.tolist(), ops.length.tolist(), strict=True):
                mem[dst:dst + n] = mem[src:src + n]
                written[dst:dst + n] += 1
    assert np.array_equal(mem, expected)
    # every destination byte written exactly once, nothing else touched
    want = np.zeros_like(written)
    for r, lay in enumerate(receivers):
        for b in range(nbuf):
            rows = want[rbufs[r][b]:rbufs[r][b] + lay.buffer_bytes].reshape(rpage * rpages, -1)
            rows[dst_tok] = 1
    assert np.array_equal(written, want)

    # shrunken regions are caught: cut the region holding some op just short of its end
    ops, regions = data.draw(st.sampled_from(all_ops))
    i = data.draw(st.integers(0, len(ops) - 1))
    dst, n = int(ops.dst[i]), int(ops.length[i])
    k = next(j for j, (base, size) in enumerate(regions) if base <= dst < base + size)
    base, size = regions[k]
    others = [*regions[:k], *regions[k + 1:]]
    for cut in ((base, dst + n - 1 - base), (dst + 1, base + size - dst - 1)):
        shrunk = others + [cut] * (cut[1] > 0)
        with pytest.raises(PlanError, match="outside|no registered region"):
            check_ops_within(ops, shrunk, "dst")


# --- the small-input fast paths (issue 15) give what the numpy paths give ---------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 63)), min_size=1, max_size=20, unique_by=lambda t: t[1]),
       st.integers(0, 3))
def test_small_fast_paths_match_numpy(pairs, shift):
    from kvd.core import planner as pl

    lay_s = PoolLayout("P", "prefill", 1, 0, 2, 2, 8, "bfloat16", 2, 32)
    lay_r = PoolLayout("D", "decode", 1, 0, 2, 2, 8, "bfloat16", 2, 32)
    hs = pl.map_heads(2, 1, 1).slices_between(0, 0)[0]
    sb = [(1 << 30) + i * lay_s.buffer_bytes for i in range(lay_s.num_buffers)]
    rb = [(2 << 30) + i * lay_r.buffer_bytes for i in range(lay_r.num_buffers)]
    src = np.array([a for a, _ in pairs], dtype=np.int64)
    dst = np.array([b for _, b in pairs], dtype=np.int64)
    regions = [(2 << 30, lay_r.num_buffers * lay_r.buffer_bytes - shift * 64)]

    def run():
        try:
            ops = pl.plan_direct_writes(lay_s, sb, src, lay_r, rb, dst, hs)
            pl.check_ops_within(ops, regions, "w")
            return ops.src.tolist(), ops.dst.tolist(), ops.length.tolist()
        except pl.PlanError as exc:
            return str(exc)

    fast = run()
    saved = pl.SMALL
    pl.SMALL = 0
    try:
        assert run() == fast
    finally:
        pl.SMALL = saved
