"""Red team: a prefill engine keeps sending chunks of a room no decode daemon asked for (yet):
40 chunks of a million page indices each (every one a valid page: 0), page offsets in order.

Until a request comes, the sender room only collects the engine's chunks (``SenderRoom.chunks``
and ``src_pages``), for up to ``timeouts.waiting_s`` (300 s by default), and nothing bounds how
many pages it collects: a room of a 16-page pool holds 40 million page indices (320 MiB) here,
as much as the engine can push in 300 s in general. A room can never have more pages than its
pool (every page holds other tokens).

Invariants: memory stays bounded; bad input gets a clear error and a counter (the chunk that
takes a room past its pool's pages is refused)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdError
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

CHUNKS, PAGES = 40, 1 << 20



def test_a_room_cannot_collect_more_pages_than_its_pool(daemons) -> None:
    pre = daemons("prefill", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    try:
        with pre.client(timeout=60) as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            time.sleep(0.5)
            before = _rss_mib(pre.proc.pid)
            refused = None
            pages = np.zeros(PAGES, dtype=np.int64)
            for i in range(CHUNKS):
                try:
                    pc.send(pid, 7, pages, False)
                except KvdError as exc:
                    refused = (i, exc)
                    break
            grown = _rss_mib(pre.proc.pid) - before
        assert refused is not None, (f"{CHUNKS * PAGES} pages of one room of a {pl.num_pages}-page pool "
                                     f"accepted; the prefill daemon grew {grown} MiB")
        assert refused[0] == 0 and "pages" in str(refused[1])
        assert grown < 64
        assert pre.status()["daemon"]["errors"].get("bad_request", 0) >= 1
    finally:
        ph.close()
