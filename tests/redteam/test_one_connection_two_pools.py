"""Red team: one engine connection registers two decode pools and asks for the same room id on
both. An engine's events, polls and waits name a room by its id alone (RoomEvent carries no
pool), so before the fix the two rooms took each other's verdict: the engine could see room 7
"released" (its pool A room aborted) while pool B's room 7 was still being written, and hand
B's pages to another request.

Invariants: the second decode room of an id on one connection is refused with a clear error and
counted; the first is unaffected and byte-exact; once it is released the id can be used on the
other pool at once, byte-exact."""

from __future__ import annotations

import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdError
from kvd.layout import PoolLayout
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=16, dtype="bfloat16", page_size=4, num_pages=32)
SEED, CANARY = 11, 0x5A


def test_a_connections_decode_rooms_need_distinct_ids(daemons) -> None:
    pre, dec = daemons("prefill"), daemons("decode")
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dls = [PoolLayout(name, "decode", 1, 0, **SHAPE) for name in ("DA", "DB")]
    ph = HostPool.create(pl)
    dhs = [HostPool.create(lay) for lay in dls]
    fill_prefill(ph, pl, SEED)
    for dh in dhs:
        fill_canary(dh, CANARY)
    try:
        with dec.client() as dc, pre.client() as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            da, db = dc.register_pool(dls[0], dhs[0]), dc.register_pool(dls[1], dhs[1])
            errors_before = sum(dec.status()["daemon"]["errors"].values())
            dc.recv(da, 7, pre.address, "P", [1, 2])
            with pytest.raises(KvdError, match="distinct ids"):
                dc.recv(db, 7, pre.address, "P", [3, 4])
            pc.send(pid, 7, [10, 11], True, aux=b"seven")
            assert dc.wait(7, timeout=20).aux == b"seven"
            assert dc.wait_released(7, timeout=20).released
            assert verify_decode(dhs[0], dls[0], pages_to_tokens([10, 11], 4), pages_to_tokens([1, 2], 4),
                                 SEED, CANARY) == []
            assert all((dhs[1].buffer(b) == CANARY).all() for b in range(dls[1].num_buffers)), \
                "the refused room wrote into its pool"
            dc.recv(db, 7, pre.address, "P", [3, 4])  # released: the id is free on the other pool
            pc.send(pid, 7, [12, 13], True, aux=b"again")
            assert dc.wait(7, timeout=20).aux == b"again"
            assert verify_decode(dhs[1], dls[1], pages_to_tokens([12, 13], 4), pages_to_tokens([3, 4], 4),
                                 SEED, CANARY) == []
        errors = dec.status()["daemon"]["errors"]
        assert sum(errors.values()) > errors_before, errors  # the refusal was counted
    finally:
        for pool in (ph, *dhs):
            pool.close()
