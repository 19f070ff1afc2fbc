"""Red team: an authorized peer, the directory and every sender of a GQA room (prefill TP 8 ->
decode TP 1 with 4 kv heads: ranks 1, 3, 5 and 7 are dummies that owe nothing), reports 2**63
bytes written from two dummy ranks.

The receiver checks a sender's ``bytes_written`` against what it owes only for a non-dummy
sender of a non-staged room, so the room's ``bytes_done`` (the sum over its senders) reaches
2**64, which msgpack cannot encode: the decode engine's next poll of its own room raises
OverflowError in the engine server, which closes the engine's connection (every pool and room
on it fails), and ``kvctl status`` fails the same way for as long as the room is there. A dummy
(or staged) sender's growing number is also progress that restarts the room's deadline.

Invariants: bad input gets a clear error and a counter (the room fails, naming the numbers);
the engine's connection and kvctl status are unaffected."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import RoomFailed
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory

pytestmark = pytest.mark.e2e


def test_a_dummy_sender_cannot_report_bytes(daemons, tmp_path: Path) -> None:
    dec = daemons("decode", *FLAGS)
    m = Mallory(tmp_path, dec)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    dh = HostPool.create(dl)
    try:
        with dec.client() as dc:
            did = dc.register_pool(dl, dh)
            dc.recv(did, 71, m.address, "P", [5, 6])
            m.expect(p.EngineQuery)
            m.send(p.EngineInfo(src=m.address, token="", engine_id="P", ready=True, tp_size=8,
                                layouts=[PoolLayout("P", "prefill", 8, r, **SHAPE).to_dict() for r in range(8)],
                                daemons=[m.address] * 8))
            ann = m.expect(p.PoolAnnounce)
            m.send(p.PoolAck(src=m.address, token="", pool_key=ann.pool_key, ok=True))
            reqs = {r.sender_rank: r for r in (m.expect(p.TransferRequest) for _ in range(8))}
            for rank in (1, 3):
                req = reqs[rank]
                assert req.dummy
                m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                        pool_key=req.pool_key, sender_rank=rank, ok=True, bytes_written=1 << 63,
                                        final=True))
            time.sleep(1.0)
            with pytest.raises(RoomFailed, match="more than the 0 it owes"):
                dc.wait(71, timeout=20)
            assert dc.poll(71).state == "failed"  # the connection still answers
        status = dec.status()
        assert status["daemon"]["errors"].get("bad_peer_message", 0) >= 1
    finally:
        m.close()
        dh.close()
