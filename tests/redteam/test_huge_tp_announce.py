"""Red team: an authorized peer (mallory, posing as a decode daemon) announces a decode pool whose
layout claims a huge TP size (2**21 ranks; heads 4, so each rank is a GQA replica), then asks a
prefill daemon for a room into it.

PoolAnnounce passes (check_compatible only asks that the TP sizes divide each other); the
TransferRequest then works out the pairing, and ``TpMapping`` builds a table with one entry per
receiver rank, on the prefill daemon's event loop: seconds (2**21) to forever and out of memory
(2**40), while heartbeats, engines and every other room wait.

Invariants: the event loop stays bounded (the daemon answers its engines at once); bad input
gets a clear error and a counter (the announce is refused)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory

pytestmark = pytest.mark.e2e

HUGE_TP = 1 << 21  # ~8 s of one CPU core here; 1 << 40 never returns


def test_a_huge_tp_size_in_a_peer_announce_does_not_stall_the_prefill_daemon(daemons, tmp_path: Path) -> None:
    pre = daemons("prefill", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    m = Mallory(tmp_path, pre)
    try:
        with pre.client() as pc:
            pc.register_pool(pl, ph, bootstrap=pre.address)
            evil = PoolLayout("D", "decode", 1, 0, **SHAPE)  # made as TP 1, sent as TP 2**21
            key = f"{m.address}#evil#1"
            m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout=evil.to_dict() | {"tp_size": HUGE_TP},
                                  buffers=[(1 << 40) + i * evil.buffer_bytes for i in range(evil.num_buffers)],
                                  session_id="127.0.0.1:1", prefill_engine_id="P"))
            ack = m.expect(p.PoolAck)
            m.send(p.TransferRequest(src=m.address, token="", room=5, transfer_id=55, pool_key=key,
                                     prefill_engine_id="P", sender_rank=0, dst_indices=np.array([1, 2]),
                                     dummy=False, deadline_s=5.0))
            time.sleep(0.5)  # the request is being handled
            t0 = time.monotonic()
            pc.status()
            took = time.monotonic() - t0
        assert took < 1.0, f"the prefill daemon's event loop was stalled {took:.1f} s by one peer message"
        assert not ack.ok, "a layout of 2**21 TP ranks was accepted"
        assert pre.status()["daemon"]["errors"].get("layout", 0) >= 1
        assert pre.alive()
    finally:
        m.close()
        ph.close()
