"""Unusual shapes end to end, byte for byte (red team round 8, held): real daemons with staging on
(so each room takes the path it would in production: staged, direct, inline or HiSparse), fake
engine rank processes, and every byte of every decode pool checked, canary included.

TP sizes that do not divide each other (3 -> 4) with head_dim 72 in float16, one kv head replicated
on every rank of both sides (TP 2 -> 3) at page size 1, MLA's 576-wide latent in fp8 4 -> 1 at page
size 64, and a HiSparse host pool fed by three ranks at page size 64.
"""

from __future__ import annotations

import pytest

from tests.support import check_reports, run_cluster
from tools.cluster import start_daemon

pytestmark = pytest.mark.e2e

FLAGS = ("--staging-enabled", "--staging-pool-bytes", "4MiB", "--staging-chunk-tokens", "8",
         "--timeouts-waiting-s", "20", "--timeouts-transfer-s", "20")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    prefill = start_daemon(tmp, "prefill", *FLAGS)
    try:
        decode = start_daemon(tmp, "decode", *FLAGS)
    except Exception:
        prefill.stop()
        raise
    yield prefill, decode
    for d in (prefill, decode):
        d.proc.terminate()  # both at once: each takes a while to stop
    for d in (prefill, decode):
        d.stop()


@pytest.mark.parametrize("shape, path", [
    # 4 heads a prefill rank, 3 a decode rank: decode rank 1 takes 1 + 2 heads from two senders
    (dict(prefill_tp=3, decode_tp=4, kv_heads=12, head_dim=72, dtype="float16"), "direct"),
    # one kv head replicated on every rank of both sides, TP sizes that do not divide, page size 1
    (dict(prefill_tp=2, decode_tp=3, kv_heads=1, page_size=1, num_pages=32), "staged"),
    # MLA's 576-wide latent in fp8 (DeepSeek's), page size 64, one chunk a page
    (dict(prefill_tp=4, decode_tp=1, kv_heads=1, mla=True, head_dim=576, dtype="float8_e4m3fn", page_size=64,
          num_pages=8, pages_per_room=2, chunk_pages=1), "direct"),
    (dict(prefill_tp=3, decode_tp=2, kv_heads=6, hisparse=True, page_size=64, num_pages=8, pages_per_room=2),
     "hisparse"),
], ids=["3-4-hd72-fp16", "kv1-2-3-page1", "mla576-fp8-4-1-page64", "hisparse-3-2-page64"])
def test_unusual_shape_is_byte_exact(pair, shape, path):
    prefill, decode = pair
    before = decode.status()["daemon"]["rooms_by_path"].get(path, 0)
    check_reports(run_cluster(prefill, decode, timeout=30, **(dict(head_dim=8) | shape)))
    st = decode.status()["daemon"]
    assert st["rooms_by_path"].get(path, 0) > before, st["rooms_by_path"]
    assert not st["errors"], st["errors"]
    assert st["staging"]["whole"] and not st["staging"]["in_use_bytes"], st["staging"]
