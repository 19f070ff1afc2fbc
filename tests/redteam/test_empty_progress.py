"""Red team: an authorized peer, the only sender a decode room names, never writes a byte but
sends a non-final TransferStatus (ok, bytes_written 0) every 1.5 s.

The receiver treats every non-final status as progress, and progress restarts the room's
deadline (kvd.core.rooms), so the room stays "transferring" for as long as the peer likes: the
decode engine waits forever on a room that moves nothing.

Invariants: every room ends within its deadline (here 6 s waiting + 6 s transferring; a status
that reports no new bytes is not progress); the pool keeps its sentinel."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.replies import RoomFailed
from tests.redteam.mallory import SENTINEL, mallory_scene

pytestmark = pytest.mark.e2e


def test_statuses_without_bytes_do_not_keep_a_room_alive(daemons, tmp_path: Path) -> None:
    with mallory_scene(daemons, tmp_path) as s, s.dec.client() as dc:
        m = s.m
        did = dc.register_pool(s.dl, s.dh)
        t0 = time.monotonic()
        dc.recv(did, 72, m.address, "P", [5, 6])
        req, _ = m.take_room(s.pl)
        stop = threading.Event()

        def keepalive() -> None:
            while not stop.wait(1.5):
                m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                        pool_key=req.pool_key, sender_rank=0, ok=True, bytes_written=0,
                                        final=False))

        pinger = threading.Thread(target=keepalive, daemon=True)
        pinger.start()
        try:
            with pytest.raises(RoomFailed):
                dc.wait(72, timeout=20)  # KvdTimeout: still "transferring" after 20 s
        finally:
            stop.set()
            pinger.join(5)
        took = time.monotonic() - t0
        assert took < 6 + 6 + 2, f"the room ended after {took:.1f} s"
        assert dc.wait_released(72, timeout=10).released
        for b in range(s.dl.num_buffers):
            assert (s.dh.buffer(b) == SENTINEL).all()
