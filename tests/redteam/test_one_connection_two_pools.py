"""Red team: one engine connection serves several pools with the same room id: the ranks of one
engine in one process (prefill TP 2 on one client, decode TP 2 on another), each rank's room
named by the engine's one room id.

Before RoomEvent named its pool (protocol 6), an engine's events, polls and waits named a room
by its id alone: two decode rooms of one id on one connection took each other's verdict (so the
second was refused), and two prefill ranks sending several chunks of one room on one connection
shared one page offset (the second rank's first chunk was refused as out of order).

Invariants: every rank's room runs; ``wait(room)`` and ``poll(room)`` report the room ended only
once every pool of the connection that began the id has ended (failed if any failed),
``wait_released`` once every one is released; bytes are exact in every decode rank and nothing outside the rooms' pages changes;
a pool that ends its use of the id may begin it again (a new use) while the other is idle."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdUnknownError
from kvd.layout import PoolLayout
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=16, dtype="bfloat16", page_size=4, num_pages=32)
SEED, CANARY = 11, 0x5A


def test_ranks_sharing_a_connection_share_a_room_id(daemons) -> None:
    pre, dec = daemons("prefill"), daemons("decode")
    pls = [PoolLayout("P", "prefill", 2, r, **SHAPE) for r in range(2)]
    dls = [PoolLayout("D", "decode", 2, r, **SHAPE) for r in range(2)]
    phs = [HostPool.create(lay) for lay in pls]
    dhs = [HostPool.create(lay) for lay in dls]
    for ph, lay in zip(phs, pls, strict=True):
        fill_prefill(ph, lay, SEED)
    for dh in dhs:
        fill_canary(dh, CANARY)
    src, dst = np.arange(10, 16), np.arange(1, 7)
    try:
        with dec.client() as dc, pre.client() as pc:
            pids = [pc.register_pool(lay, ph, bootstrap=pre.address) for lay, ph in zip(pls, phs, strict=True)]
            dids = [dc.register_pool(lay, dh) for lay, dh in zip(dls, dhs, strict=True)]
            for did in dids:
                dc.recv(did, 7, pre.address, "P", dst)
            # Prefill rank 0 sends its whole room (three chunks) before rank 1 starts: decode rank
            # 0's room may end meanwhile, but the connection's room 7 is not done until rank 1's is.
            for i in range(0, 6, 2):
                pc.send(pids[0], 7, src[i:i + 2], i == 4, aux=b"seven" if i == 4 else b"", wait=False)
            assert not (st := dc.pushed(7)) or not st.done
            assert not dc.poll(7).done  # a poll asks after each pool that began the id, merged the same way
            for i in range(0, 6, 2):
                pc.send(pids[1], 7, src[i:i + 2], i == 4, aux=b"seven" if i == 4 else b"")
            assert pc.wait(7, timeout=20).state == "success"
            done = dc.wait(7, timeout=20)
            assert done.aux == b"seven" and done.bytes_done == done.bytes_total > 0
            assert dc.wait_released(7, timeout=20).released
            with dec.client() as other, pytest.raises(KvdUnknownError, match="not registered on this connection"):
                other._request(*other._t.poll(7, dids[0]))  # another connection's pool: no peeking at its rooms
            polled = dc.poll(7)
            assert polled.state == "success" and polled.released and polled.bytes_done == done.bytes_done
            for dh, lay in zip(dhs, dls, strict=True):
                assert verify_decode(dh, lay, pages_to_tokens(src, 4), pages_to_tokens(dst, 4), SEED, CANARY) == []
            # A new use of the id on one rank's pools only: one decode rank, the prefill rank it reads from.
            more_src, more_dst = np.array([20, 21]), np.array([30, 31])
            dc.recv(dids[1], 7, pre.address, "P", more_dst)
            pc.send(pids[1], 7, more_src, True, aux=b"again")
            assert dc.wait(7, timeout=20).aux == b"again"
            assert verify_decode(dhs[1], dls[1], pages_to_tokens(more_src, 4), pages_to_tokens(more_dst, 4), SEED,
                                 CANARY, ignore_tokens=pages_to_tokens(dst, 4)) == []
        assert not dec.status()["daemon"]["errors"].get("bad_request")
    finally:
        for pool in (*phs, *dhs):
            pool.close()
