"""Red team: a decode engine names one destination page twice in a room.

Two source pages then land in one page, whichever write comes last winning, and the room's
other page never gets its bytes: never a valid request. The planners refused a repeat inside one
chunk ("dst tokens repeat a token index", the room failed), but a repeat across two chunks was
planned chunk by chunk and passed, and the staged path never checked: ``recv([5, 5])`` for a
TP 2 -> 1 room with staging on succeeded, and so did ``[7, 8, 7]`` sent a page a chunk on the
direct path.

Invariant: bad input costs one request: a room whose destination pages (HiSparse: tokens)
repeat is refused at ``recv``, naming the index, on every path; the daemons serve on, byte-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdBadRequest
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE
from tests.support import check_reports, run_cluster

pytestmark = pytest.mark.e2e

STAGED = (*FLAGS, "--staging-enabled", "--staging-pool-bytes", "4MiB", "--staging-chunk-tokens", "8",
          "--transfer-inline-max-bytes", "0")


def test_repeated_destination_indices_are_refused_at_recv(daemons) -> None:
    pre, dec = daemons("prefill", *STAGED), daemons("decode", *STAGED)
    dl = PoolLayout("D", "decode", 1, 0, **dict(SHAPE, num_pages=64))
    hl = PoolLayout("H", "decode", 1, 0, **dict(SHAPE, page_size=1, num_pages=64), hisparse=True)
    with HostPool.create(dl) as dh, HostPool.create(hl) as hh, dec.client() as dc:
        did, hid = dc.register_pool(dl, dh), dc.register_pool(hl, hh)
        for room, pages in enumerate(([5, 5], [7, 8, 7], [*range(40), 39])):
            with pytest.raises(KvdBadRequest, match=f"repeat index {pages[-1]}"):
                dc.recv(did, room, pre.address, "P", np.array(pages))
        with pytest.raises(KvdBadRequest, match="destination tokens repeat index 3"):
            dc.recv(hid, 10, pre.address, "P", np.array([3, 9, 3]), enable_hisparse=True)
        assert not dec.status()["rooms"]
    assert dec.status()["daemon"]["errors"].get("bad_request", 0) >= 4
    # distinct pages, staged and in several chunks: byte-exact as before
    check_reports(run_cluster(pre, dec, prefill_tp=2, decode_tp=1, kv_heads=4, head_dim=8, chunk_pages=1))
    assert dec.status()["daemon"]["rooms_by_path"].get("staged", 0) >= 3
