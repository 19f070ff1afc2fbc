"""HiSparse end to end: prefill pages (size 16 / 64) written straight into a decode host
pool of page size 1, lengths ending mid-page, byte for byte, over real daemons."""

from __future__ import annotations

import pytest

from tests.support import WRITES, check_reports, run_cluster, writes_checked, writes_pair

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("page_size, prefill_tp, decode_tp, kv_heads, mla", [
    (16, 1, 1, 4, False),
    (64, 1, 1, 4, False),
    (16, 4, 1, 8, False),   # hetero TP: per-slice into host memory
    (16, 4, 1, 2, False),   # GQA replicas
    (64, 2, 2, 8, False),
    (16, 1, 1, 1, True),    # MLA latent pool
    (64, 4, 1, 1, True),
])
@pytest.mark.parametrize("writes", list(WRITES))
def test_hisparse_byte_exact(daemons, writes, page_size, prefill_tp, decode_tp, kv_heads, mla):
    prefill, decode = writes_pair(daemons, writes)
    check_reports(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, kv_heads=kv_heads,
                       mla=mla, hisparse=True, page_size=page_size, num_pages=16, pages_per_room=3,
                       head_dim=8, layers=2))
    writes_checked(prefill, writes)


@pytest.mark.parametrize("writes", list(WRITES))
def test_hisparse_room_ending_with_an_empty_chunk(daemons, writes):
    """The engine's last chunk has no pages (the room's last, partial page went with the chunk
    before): the room succeeds, byte for byte. It failed with "sender sent more tokens"."""
    import numpy as np

    from kvd.hostpool import HostPool
    from kvd.layout import PoolLayout

    prefill, decode = writes_pair(daemons, writes)
    src_lay = PoolLayout("P", "prefill", 1, 0, 2, 2, 8, "bfloat16", 4, 8)
    dst_lay = PoolLayout("D", "decode", 1, 0, 2, 2, 8, "bfloat16", 1, 32, hisparse=True)
    with HostPool.create(src_lay) as src, HostPool.create(dst_lay) as dst, prefill.client() as pc, \
            decode.client() as dc:
        rng = np.random.default_rng(0)
        for b in range(src_lay.num_buffers):
            src.buffer(b)[...] = rng.integers(0, 256, src.buffer(b).shape, dtype=np.uint8)
        dst.fill(0xA5)
        sid = pc.register_pool(src_lay, src, bootstrap=prefill.address)
        did = dc.register_pool(dst_lay, dst)
        pages, tokens = np.array([5, 2, 7], np.int64), np.array([9, 3, 30, 0, 17, 11, 4, 25, 8, 1], np.int64)
        dc.recv(did, 1, prefill.address, "P", tokens, enable_hisparse=True)
        pc.send(sid, 1, pages[:2], False)
        pc.send(sid, 1, pages[2:], False)  # ends two tokens into its last page
        pc.send(sid, 1, pages[:0], True, aux=b"first")
        assert dc.wait(1, timeout=20).aux == b"first"
        pc.wait(1, timeout=20)
        rows = (pages[:, None] * 4 + np.arange(4)).reshape(-1)[:len(tokens)]
        for b in range(src_lay.num_buffers):
            want = np.full_like(dst.buffer(b), 0xA5)
            want[tokens] = src.buffer(b)[rows]
            assert np.array_equal(dst.buffer(b), want), f"buffer {b}"
    writes_checked(prefill, writes)
