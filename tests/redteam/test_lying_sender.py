"""Red team: an authorized peer, the only sender a decode room names, reports success without
writing. Invariant: the room fails with the numbers; the pool keeps its sentinel."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.replies import RoomFailed
from tests.redteam.mallory import mallory_scene

pytestmark = pytest.mark.e2e


def test_a_sender_claiming_success_without_writing_fails_the_room(daemons, tmp_path: Path) -> None:
    with mallory_scene(daemons, tmp_path) as s, s.dec.client() as dc:
        m = s.m
        did = dc.register_pool(s.dl, s.dh)
        dc.recv(did, 71, m.address, "P", [5, 6])
        req, _ = m.take_room(s.pl)
        m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                pool_key=req.pool_key, sender_rank=0, ok=True, aux=b"lie",
                                bytes_written=0, final=True))
        with pytest.raises(RoomFailed):
            dc.wait(71, timeout=20)
