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
