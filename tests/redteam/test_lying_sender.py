"""Red team: an authorized peer, the only sender a decode room names, reports success without
writing. Invariant: the room fails with the numbers; the pool keeps its sentinel."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import RoomFailed
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SENTINEL, SHAPE, Mallory

pytestmark = pytest.mark.e2e


def test_a_sender_claiming_success_without_writing_fails_the_room(daemons, tmp_path: Path) -> None:
    _pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    dh = HostPool.create(dl)
    dh.fill(SENTINEL)
    m = Mallory(tmp_path, dec)
    try:
        with dec.client() as dc:
            did = dc.register_pool(dl, dh)
            dc.recv(did, 71, m.address, "P", [5, 6])
            req, _ = m.take_room(pl)
            m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                    pool_key=req.pool_key, sender_rank=0, ok=True, aux=b"lie",
                                    bytes_written=0, final=True))
            print('STATUS', dc.poll(71))
            with pytest.raises(RoomFailed):
                dc.wait(71, timeout=20)
    finally:
        m.close()
        dh.close()
