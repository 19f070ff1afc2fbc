"""Red team: an authorized peer (mallory) holds 16,000 sender rooms on a prefill daemon
(TransferRequests into its own announced pool, within the per-pool bound of pages + 1,024),
then sends 5,000 AbortTransfers naming transfers that do not exist.

Each AbortTransfer was checked by the ownership gate with a pass over every sender room
(``trust_gate``'s ``transfer_src``) and then handled by a task that passed over every sender
room again (``SenderSide._abort``): one small message cost two scans of the rooms in flight,
and 256 of them are read per wake-up of the peer loop, so the burst held the event loop for
3.1 s here (an engine's round trip before it: 35 ms at most).

Invariant: the event loop stays responsive; a peer message costs the same however many rooms
are in flight."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import Mallory, engine_lag, room_known

pytestmark = pytest.mark.e2e

ROOMS, ABORTS = 16_000, 5_000
SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="uint8", page_size=1, num_pages=ROOMS)
FLAGS = ("--timeouts-waiting-s", "120", "--timeouts-bootstrap-s", "60", "--timeouts-transfer-s", "120")


def test_aborts_of_unknown_transfers_do_not_scan_every_room(daemons, tmp_path: Path) -> None:
    pre = daemons("prefill", *FLAGS)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    m = Mallory(tmp_path, pre)
    try:
        with pre.client(timeout=60) as pc, pre.client(timeout=60) as probe:
            pc.register_pool(pl, ph, bootstrap=pre.address)
            key = f"{m.address}#dec#1"
            m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout=dl.to_dict(),
                                  buffers=[(1 << 40) + i * dl.buffer_bytes for i in range(dl.num_buffers)],
                                  session_id="127.0.0.1:1", prefill_engine_id="P"))
            assert m.expect(p.PoolAck).ok
            for r in range(ROOMS):
                m.send(p.TransferRequest(src=m.address, token="", room=r, transfer_id=r + 1, pool_key=key,
                                         prefill_engine_id="P", sender_rank=0, dst_indices=np.array([r]),
                                         dummy=False, deadline_s=120.0, inline_max_bytes=0))
            end = time.monotonic() + 30
            while not room_known(pc, ROOMS - 1):  # the last request made its room
                assert time.monotonic() < end, "mallory's requests did not make their rooms"
                time.sleep(0.2)
            time.sleep(1.0)
            with engine_lag(probe) as lat:
                for i in range(ABORTS):
                    m.send(p.AbortTransfer(src=m.address, token="", room=i, transfer_id=(1 << 40) + i, pool_key=key,
                                           sender_rank=0, reason="x"))
                for _ in range(ABORTS):
                    m.expect(p.AbortAck, timeout=30)
        assert max(lat) < 1.0, f"an engine waited {max(lat):.1f} s while {ABORTS} aborts were handled"
    finally:
        m.close()
        ph.close()
