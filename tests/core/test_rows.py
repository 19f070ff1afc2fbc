"""Row copies: the compact form of a strided head slice stands for exactly the planner's ops."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.core.layout import PoolLayout
from kvd.core.planner import DirectPlanner, PlanError, WriteOps, map_layouts
from kvd.core.rows import RowBatch, RowCopy, check_rows_within, join_plans, plan_slice

CASES = [(4, 1, 8), (1, 4, 8), (2, 1, 8), (1, 8, 8), (4, 2, 8), (2, 4, 2), (8, 2, 4), (3, 1, 6), (1, 4, 2)]


@pytest.mark.parametrize(("sender_tp", "receiver_tp", "kv_heads"), CASES)
def test_plan_slice_stands_for_the_planners_ops(sender_tp: int, receiver_tp: int, kv_heads: int) -> None:
    gen = np.random.default_rng(sender_tp * 10 + receiver_tp)
    for s_rank in range(sender_tp):
        for r_rank in range(receiver_tp):
            s = PoolLayout("P", "prefill", sender_tp, s_rank, 3, kv_heads, 16, "bfloat16", 4, 32)
            r = PoolLayout("D", "decode", receiver_tp, r_rank, 3, kv_heads, 16, "bfloat16", 4, 32)
            sbufs = [(1 << 30) + i * s.buffer_bytes for i in range(s.num_buffers)]
            rbufs = [(1 << 34) + i * r.buffer_bytes for i in range(r.num_buffers)]
            for hs in map_layouts(s, r).slices_between(s_rank, r_rank):
                planner = DirectPlanner(s, sbufs, r, rbufs, hs)
                src = gen.choice(s.num_tokens, 9, replace=False)
                dst = gen.choice(r.num_tokens, 9, replace=False)
                want = planner.plan(src, dst)
                got = plan_slice(planner, src, dst)
                ops = got.ops() if isinstance(got, RowBatch) else got
                assert isinstance(got, RowBatch) != planner.full_row
                assert np.array_equal(ops.src, want.src) and np.array_equal(ops.dst, want.dst)
                assert np.array_equal(ops.length, want.length)
                assert len(got) == len(want) and got.total_bytes == want.total_bytes
                check_rows_within(got, [(b, s.buffer_bytes) for b in sbufs], "src", side="src") \
                    if isinstance(got, RowBatch) else None


def _copy(rows: list[int], base: int = 1000) -> RowBatch:
    return RowBatch((RowCopy(np.array([base, base + 100]), np.array([base, base + 100]), np.array(rows),
                             np.array(rows), 10, 10, 2, 2, 4),))


def test_spans_are_checked_whole_per_buffer() -> None:
    regions = [(1000, 100), (1100, 100)]
    check_rows_within(_copy([0, 9]), regions, "dst")  # rows 0..9 of both buffers: inside
    with pytest.raises(PlanError):
        check_rows_within(_copy([0, 10]), regions, "dst")  # row 10 of buffer 0 is buffer 1's
    with pytest.raises(PlanError):
        check_rows_within(_copy([3], base=900), regions, "dst")  # below every region


def test_bad_row_copies_are_refused() -> None:
    with pytest.raises(PlanError):
        RowCopy(np.array([0]), np.array([0, 1]), np.array([0]), np.array([0]), 8, 8, 0, 0, 8)
    with pytest.raises(PlanError):
        RowCopy(np.array([0]), np.array([0]), np.array([0]), np.array([0]), 8, 8, 4, 0, 8)  # past the row
    with pytest.raises(PlanError):
        _copy([-1]).parts[0].spans("src")


def test_join_keeps_rows_whole_and_ops_as_ops() -> None:
    a, b = _copy([1]), _copy([2])
    joined = join_plans([a, b])
    assert isinstance(joined, RowBatch) and len(joined.parts) == 1 and len(joined) == 4  # one slice: merged
    ops = WriteOps(np.array([1]), np.array([2]), np.array([3]))
    mixed = join_plans([ops, a])
    assert isinstance(mixed, WriteOps) and len(mixed) == 3


def test_coalesce_joins_runs_that_continue_each_other_only() -> None:
    from kvd.core.planner import coalesce

    # two chunks of one buffer run (0..100, 100..300 -> 1000..1300), one op elsewhere, one whose
    # source continues but destination does not
    ops = WriteOps(np.array([100, 0, 5000, 300]), np.array([1100, 1000, 9000, 7000]), np.array([200, 100, 8, 4]))
    got = coalesce(ops)
    assert sorted(zip(got.src.tolist(), got.dst.tolist(), got.length.tolist(), strict=True)) == [
        (0, 1000, 300), (300, 7000, 4), (5000, 9000, 8)]
    assert got.total_bytes == ops.total_bytes
    joined = join_plans([WriteOps(np.array([0]), np.array([10]), np.array([5])),
                         WriteOps(np.array([5]), np.array([15]), np.array([5]))])
    assert isinstance(joined, WriteOps) and joined.src.tolist() == [0] and joined.length.tolist() == [10]


def test_chunks_of_one_slice_merge_into_one_copy() -> None:
    a, b = _copy([1, 2]), _copy([7])
    other = RowBatch((RowCopy(np.array([1000, 1100]), np.array([1000, 1100]), np.array([4]), np.array([4]),
                              10, 10, 6, 6, 4),))  # another head offset: its own copy
    joined = join_plans([a, b, other])
    assert isinstance(joined, RowBatch) and len(joined.parts) == 2
    assert joined.parts[0].src_rows.tolist() == [1, 2, 7] and len(joined) == 8
    ops = joined.ops()
    want = WriteOps.concat([a.ops(), b.ops(), other.ops()])
    assert sorted(zip(ops.src.tolist(), ops.dst.tolist(), ops.length.tolist(), strict=True)) == \
        sorted(zip(want.src.tolist(), want.dst.tolist(), want.length.tolist(), strict=True))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_level_plan_is_the_token_plan(page_size: int) -> None:
    from kvd.core.planner import pages_to_tokens

    s = PoolLayout("P", "prefill", 2, 1, 3, 8, 16, "bfloat16", page_size, 64)
    r = PoolLayout("D", "decode", 2, 1, 3, 8, 16, "bfloat16", page_size, 64)
    sbufs = [(1 << 30) + i * s.buffer_bytes for i in range(s.num_buffers)]
    rbufs = [(1 << 34) + i * r.buffer_bytes for i in range(r.num_buffers)]
    planner = DirectPlanner(s, sbufs, r, rbufs, map_layouts(s, r).slices_between(1, 1)[0])
    src = np.array([3, 4, 5, 9, 10, 40, 41, 42, 43])
    dst = np.array([7, 8, 20, 21, 22, 0, 1, 2, 3])
    want = planner.plan(pages_to_tokens(src, page_size), pages_to_tokens(dst, page_size))
    got = planner.plan_pages(src, dst)
    assert np.array_equal(got.src, want.src) and np.array_equal(got.dst, want.dst)
    assert np.array_equal(got.length, want.length)
    for bad in (np.array([64]), np.array([-1])):
        with pytest.raises(PlanError):
            planner.plan_pages(bad, np.array([0]))
    with pytest.raises(PlanError):
        planner.plan_pages(np.array([1, 2]), np.array([5, 5]))


@pytest.mark.parametrize(("sender_tp", "receiver_tp", "kv_heads", "page_size"),
                         [(4, 1, 8, 4), (1, 4, 8, 16), (2, 4, 2, 2), (4, 2, 8, 1)])
def test_page_rows_stand_for_the_token_ops(sender_tp: int, receiver_tp: int, kv_heads: int, page_size: int) -> None:
    from kvd.core.planner import pages_to_tokens
    from kvd.core.rows import plan_slice_pages

    s = PoolLayout("P", "prefill", sender_tp, 0, 2, kv_heads, 16, "bfloat16", page_size, 40)
    r = PoolLayout("D", "decode", receiver_tp, 0, 2, kv_heads, 16, "bfloat16", page_size, 40)
    sbufs = [(1 << 30) + i * s.buffer_bytes for i in range(s.num_buffers)]
    rbufs = [(1 << 34) + i * r.buffer_bytes for i in range(r.num_buffers)]
    src, dst = np.array([5, 6, 7, 30, 2]), np.array([39, 0, 1, 2, 20])
    for hs in map_layouts(s, r).slices_between(0, 0):
        planner = DirectPlanner(s, sbufs, r, rbufs, hs)
        want = planner.plan(pages_to_tokens(src, page_size), pages_to_tokens(dst, page_size))
        got = plan_slice_pages(planner, src, dst)
        ops = got.ops() if isinstance(got, RowBatch) else got
        key = sorted(zip(ops.src.tolist(), ops.dst.tolist(), ops.length.tolist(), strict=True))
        assert key == sorted(zip(want.src.tolist(), want.dst.tolist(), want.length.tolist(), strict=True))
        if isinstance(got, RowBatch):
            check_rows_within(got, [(b, r.buffer_bytes) for b in rbufs], "dst")
            starts, lengths = got.parts[0].spans("dst")  # the span ends at page 39's last row's run
            assert int((starts + lengths).max()) == max(int(d) + int(n) for d, n in zip(ops.dst, ops.length, strict=True))
            check_rows_within(got, list(zip(starts.tolist(), lengths.tolist(), strict=True)), "dst")
            with pytest.raises(PlanError):
                check_rows_within(got, list(zip(starts.tolist(), (lengths - 1).tolist(), strict=True)), "dst")
        with pytest.raises(PlanError):
            plan_slice_pages(planner, np.array([40]), np.array([0]))
