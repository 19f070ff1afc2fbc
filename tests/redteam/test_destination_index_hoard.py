"""Red team: a decode engine names more destination indices than its pool has.

A prefill room may hold no more pages than its pool (the sender side refuses the chunk), but a
decode room's destination indices were bounded only by what one peer message carries
(``peer.max_message_bytes``, 64 MiB): ``recv`` of 7.8 million copies of page 0 into a one-page
pool was taken, and the daemon kept the array (and sent it to every sender) until the room
ended. With a pool's rooms bounded by its pages + 1,024, one engine with a one-page pool could
make the daemon hold ~60 MB a room, 1,025 rooms: ~60 GB (measured: +60 MB of RSS a room).

Invariant: bad input costs one request (refused at once, naming the bound, counted), never the
daemon's memory; a room naming as many indices as its pool holds is still taken and byte-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdBadRequest
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, _fresh_room_works, rss_mib

pytestmark = pytest.mark.e2e


def test_more_destination_indices_than_the_pool_holds_are_refused(daemons) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    hl = PoolLayout("H", "decode", 1, 0, **dict(SHAPE, page_size=1, num_pages=32), hisparse=True)
    with HostPool.create(dl) as dh, HostPool.create(hl) as hh, dec.client() as dc:
        did, hid = dc.register_pool(dl, dh), dc.register_pool(hl, hh)
        before = rss_mib(dec.proc.pid)
        for room in range(8):  # 8 x 32 MB of valid indices (page 0, again and again)
            with pytest.raises(KvdBadRequest, match="more than the 16 of its pool"):
                dc.recv(did, room, pre.address, "P", np.zeros(4 << 20, np.int64))
        with pytest.raises(KvdBadRequest, match="more than the 16 of its pool"):
            dc.recv(did, 50, pre.address, "P", np.arange(17) % 16)  # one over
        with pytest.raises(KvdBadRequest, match="33 destination tokens, more than the 32"):
            dc.recv(hid, 51, pre.address, "P", np.arange(33) % 32, enable_hisparse=True)
        assert rss_mib(dec.proc.pid) - before < 64, "the refused rooms' indices were kept"
        dc.recv(did, 60, pre.address, "P", np.arange(16))  # as many as the pool holds: taken
        dc.abort(did, 60)
        dc.wait_released(60, timeout=20)
    assert dec.status()["daemon"]["errors"].get("bad_request", 0) >= 10
    _fresh_room_works(pre, dec, PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("E", "decode", 1, 0, **SHAPE))
