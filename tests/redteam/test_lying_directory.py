"""Red team: an authorized peer (mallory) is the "prefill directory" a decode engine was pointed
at, and then lies: empty or inconsistent topologies, and (as the sender it names) statuses that
do not match what it wrote.

Invariants: the decode room ends within its deadline with a reason; the decode pool outside the
room keeps its sentinel; the daemon keeps serving a fresh byte-exact room afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.replies import RoomFailed
from kvd.layout import PoolLayout
from tests.redteam.mallory import SENTINEL, SHAPE, _fresh_room_works, mallory_scene

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("case", ["empty", "tp_mismatch", "unknown_daemon"])
def test_a_lying_directory_fails_the_room_in_time(daemons, tmp_path: Path, case: str) -> None:
    with mallory_scene(daemons, tmp_path) as s:
        pre, dec, pl, dl, dh, m = s.pre, s.dec, s.pl, s.dl, s.dh, s.m
        with dec.client() as dc:
            did = dc.register_pool(dl, dh)
            t0 = time.monotonic()
            dc.recv(did, 70, m.address, "P", [5, 6])
            q = m.expect(p.EngineQuery)
            assert q.engine_id == "P"
            if case == "empty":
                info = p.EngineInfo(src=m.address, token="", engine_id="P", ready=True, tp_size=0, layouts=[],
                                    daemons=[])
            elif case == "tp_mismatch":  # says TP 2, the layouts say TP 1 and rank 0 twice
                info = p.EngineInfo(src=m.address, token="", engine_id="P", ready=True, tp_size=2,
                                    layouts=[pl.to_dict(), pl.to_dict()], daemons=[m.address, m.address])
            else:  # a daemon address that nobody serves
                info = p.EngineInfo(src=m.address, token="", engine_id="P", ready=True, tp_size=1,
                                    layouts=[pl.to_dict()], daemons=["tcp://127.0.0.1:1"])
            m.send(info)
            with pytest.raises(RoomFailed) as failed:
                dc.wait(70, timeout=20)
            took = time.monotonic() - t0
            assert took < 6 + 2, f"room took {took:.1f} s, deadline is 6 s"
            assert str(failed.value)
            rel = dc.wait_released(70, timeout=10)
            assert rel.released
        for b in range(dl.num_buffers):
            assert (dh.buffer(b) == SENTINEL).all()
        assert dec.alive()
        _fresh_room_works(pre, dec, PoolLayout("Q", "prefill", 1, 0, **SHAPE), PoolLayout("E", "decode", 1, 0, **SHAPE))
