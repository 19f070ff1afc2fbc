"""Red team: an authorized peer (mallory), the directory and only sender of a decode engine's
rooms, completes each of them with a final status carrying 8 MiB of aux (a sender's aux is
the engine's first token and metadata rows: kilobytes; a peer message may carry 64 MiB).

The decode daemon keeps the final events of each engine connection's latest 4,096 ended rooms
for polls after the end (``Daemon._ended_rooms``), aux and all: +8 MiB of daemon memory per
room here, up to 4,096 x 64 MiB per decode engine connection, for as long as the engine stays
connected (a peer needs only rooms the engine asks it for).

Invariants: the ended events a connection keeps are bounded in bytes as well as in number
(``ENDED_AUX_BYTES`` of aux; the oldest go first: a late poll of those says unknown room, as past
the count); a late poll of a recent room still gets its final event with its aux; the daemon
keeps serving a fresh byte-exact room."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.shell.daemon import ENDED_AUX_BYTES
from tests.redteam.mallory import Scene, _fresh_room_works, mallory_scene
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

AUX, COUNT = 8 << 20, 8



def _rooms(s: Scene, dc, did: int, first: int) -> None:
    for room in range(first, first + COUNT):
        dc.recv(did, room, s.m.address, s.pl.engine_id, [room % 16])
        if room == 0:
            req, _ = s.m.take_room(s.pl)
        else:  # the topology and the pool's acceptance are cached: the request comes at once
            req = s.m.expect(p.TransferRequest)
        owed = s.dl.page_bytes * s.dl.num_buffers  # what it claims to have written (it lies)
        s.m.send(p.TransferStatus(src=s.m.address, token="", room=room, transfer_id=req.transfer_id,
                                  pool_key=req.pool_key, sender_rank=0, ok=True, bytes_written=owed,
                                  final=True, aux=bytes([room]) * AUX))
        assert len(dc.wait(room, timeout=30).aux) == AUX
        dc.forget(room)  # the engine is done with it (its own copy goes)


def test_ended_rooms_keep_bounded_aux(daemons, tmp_path: Path) -> None:
    with mallory_scene(daemons, tmp_path) as s:
        with s.dec.client(timeout=60) as dc:
            did = dc.register_pool(s.dl, s.dh)
            _rooms(s, dc, did, 0)  # a first round: what buffers and the allocator take for them
            before = _rss_mib(s.dec.proc.pid)
            _rooms(s, dc, did, COUNT)
            grown = _rss_mib(s.dec.proc.pid) - before
            # 64 MiB more of aux went by; the daemon keeps at most ENDED_AUX_BYTES of it in all.
            assert grown < 32, f"the decode daemon kept {grown} MiB of ended rooms' aux"
            late = dc.poll(2 * COUNT - 1)  # the latest room: its final event, aux and all
            assert late.state == "success" and late.aux == bytes([2 * COUNT - 1]) * AUX
            with pytest.raises(Exception, match="no room 0"):
                dc.poll(0)  # among the oldest: past the byte bound
            assert ENDED_AUX_BYTES < COUNT * AUX
        _fresh_room_works(s.pre, s.dec, s.pl, s.dl)
