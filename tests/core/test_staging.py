"""The staged path's pure parts: who writes which block, chunk geometry, grant checks, and the
receiver's chunk ledger (no sockets, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvd.layout import PoolLayout
from kvd.planner import map_heads
from kvd.staging import (
    ChunkGeometry,
    ChunkLedger,
    StagingError,
    check_grant,
    page_runs,
    plan_chunks,
    staged_writers,
    staging_applies,
)


def _valid_tp(heads: int) -> list[int]:
    return [tp for tp in range(1, 17) if heads % tp == 0 or tp % heads == 0]


@given(st.sampled_from([1, 2, 4, 6, 8, 16]), st.data())
def test_writers_cover_every_receiver_head_exactly_once(heads, data):
    sender_tp = data.draw(st.sampled_from(_valid_tp(heads)))
    receiver_tp = data.draw(st.sampled_from([tp for tp in _valid_tp(heads)
                                             if tp % sender_tp == 0 or sender_tp % tp == 0]))
    mapping = map_heads(heads, sender_tp, receiver_tp)
    for r in range(receiver_tp):
        writers = staged_writers(mapping, r)
        assert writers is not None
        assert [w.sender_rank for w in writers] == sorted(w.sender_rank for w in writers)
        local = max(1, heads // receiver_tp)
        covered = sorted(h for w in writers for h in range(w.dst_head_offset, w.dst_head_offset + w.num_heads))
        assert covered == list(range(local))
        assert len({w.num_heads for w in writers}) == 1


@given(total=st.integers(1, 100_000), per_token=st.integers(1, 1 << 20), writers=st.integers(1, 16),
       max_tokens=st.integers(1, 16384), page=st.sampled_from([1, 16, 64]))
def test_chunks_tile_the_room_and_respect_both_limits(total, per_token, writers, max_tokens, page):
    limit = 64 << 20
    try:
        g = plan_chunks(total, per_token, writers, max_tokens=max_tokens, max_region_bytes=limit, page_size=page)
    except StagingError:
        assert per_token * writers > limit
        return
    starts = [g.tokens(c) for c in range(g.num_chunks)]
    assert starts[0][0] == 0 and starts[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(starts, starts[1:], strict=False))
    assert g.chunk_tokens <= max_tokens and g.region_bytes(0) <= limit
    if g.chunk_tokens >= page and total >= page:
        assert g.chunk_tokens % page == 0
    # Writer slots of a region are disjoint and fill it exactly.
    slots = [g.slot(1000, 0, w) for w in range(writers)]
    assert slots[0][0] == 1000 and all(a[0] + a[1] == b[0] for a, b in zip(slots, slots[1:], strict=False))
    assert slots[-1][0] + slots[-1][1] == 1000 + g.region_bytes(0)


def test_grant_checks_name_the_pool_size():
    g = ChunkGeometry(total_tokens=100, chunk_tokens=40, num_writers=2, block_bytes_per_token=8)
    check_grant(g, 0, 0, 640)  # 40 tokens x 8 bytes x 2 writers
    check_grant(g, 2, 0, 320)  # the last chunk is 20 tokens
    for chunk, offset, size in [(0, 1, 640), (0, -1, 10_000), (1, 1 << 40, 1 << 20)]:
        with pytest.raises(StagingError, match=f"outside the receiver's {size}-byte staging pool"):
            check_grant(g, chunk, offset, size)
    with pytest.raises(StagingError, match="outside the room's 3 chunks"):
        check_grant(g, 3, 0, 1 << 20)


def test_ledger_refuses_everything_a_correct_sender_never_does():
    g = ChunkGeometry(total_tokens=24, chunk_tokens=8, num_writers=2, block_bytes_per_token=16)
    ledger = ChunkLedger(g, (1, 3))
    assert ledger.grant(0) == 0 and ledger.grant(4096) == 1 and ledger.outstanding == 2
    with pytest.raises(StagingError, match="not a staged writer"):
        ledger.report(0, 2, 128)
    with pytest.raises(StagingError, match="never granted"):
        ledger.report(2, 1, 128)
    with pytest.raises(StagingError, match="its block is 128"):
        ledger.report(0, 1, 129)
    assert ledger.report(0, 1, 128) is False
    with pytest.raises(StagingError, match="reported chunk 0 twice"):
        ledger.report(0, 1, 128)
    assert ledger.report(0, 3, 128) is True
    ledger.scattered.add(0)
    with pytest.raises(StagingError, match="twice"):
        ledger.report(0, 3, 128)
    assert ledger.missing_from(1) == [1, 2] and ledger.writer_index(3) == 1
    assert not ledger.done and ledger.outstanding == 1


def test_which_rooms_stage():
    def lay(tp: int, **kw) -> PoolLayout:
        heads = 1 if kw.get("is_mla") else 8
        return PoolLayout("E", "prefill", tp, 0, 2, heads, 16, "bfloat16", 4, 8, **kw)

    assert staging_applies(lay(4), lay(1), hisparse=False) == ""
    assert "same TP" in staging_applies(lay(2), lay(2), hisparse=False)
    # Same TP stages only a fragmented room: many runs of receiver pages, short in bytes.
    page = lay(2).page_bytes  # 4 tokens x 4 heads x 16 x 2 B = 512 B per buffer
    cut = 4 * page  # runs under 4 pages on average

    def same_tp(pages: np.ndarray, run_bytes: int = cut) -> str:
        return staging_applies(lay(2), lay(2), hisparse=False, dst_pages=pages, run_bytes=run_bytes)

    assert "same TP" in same_tp(np.arange(64))
    assert "same TP" in same_tp(np.arange(0, 30, 2))  # 15 runs: too few to matter
    assert same_tp(np.arange(0, 64, 2)) == ""  # 32 runs of one page
    assert "same TP" in same_tp(np.arange(0, 64, 2), run_bytes=0)  # 0: never (RDMA)
    runs_of_four = np.concatenate([np.arange(p, p + 4) for p in range(0, 200, 10)])  # 20 runs of 4 pages
    assert page_runs(runs_of_four) == 20
    assert "same TP" in same_tp(runs_of_four)
    assert same_tp(runs_of_four[:-1]) == ""  # 79 pages in 20 runs
    assert same_tp(runs_of_four, run_bytes=cut + 1) == ""
    assert "MLA" in staging_applies(lay(2, is_mla=True), lay(1, is_mla=True), hisparse=False)
    assert "HiSparse" in staging_applies(lay(2), lay(1), hisparse=True)
