"""Red team: an authorized peer (mallory) holds 16,000 sender rooms on a prefill daemon
(TransferRequests into its own announced pool, within the per-pool bound of pages + 1,024),
announces ``peer.max_pools`` decode pools, then keeps announcing new pool keys.

At ``peer.max_pools`` every new key makes the directory forget the peer's oldest idle pool,
and to find which pools are idle it built the set of pool keys every sender room in flight
writes into (``pools_in_use``): one small PoolAnnounce cost a pass over every room in flight
(anyone's), so a burst of announces held the event loop for seconds.

Invariant: the event loop stays responsive; a peer message costs the same however many rooms
are in flight. Real daemons (e2e), one prefill daemon and mallory."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import Mallory, engine_lag, room_known

pytestmark = pytest.mark.e2e

ROOMS, MAX_POOLS, ANNOUNCES = 16_000, 1024, 5_000  # peer.max_pools: its default
SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="uint8", page_size=1, num_pages=ROOMS)
FLAGS = ("--timeouts-waiting-s", "120", "--timeouts-bootstrap-s", "60", "--timeouts-transfer-s", "120")


def _acks(m: Mallory, n: int, timeout: float = 60.0) -> list[p.PoolAck]:
    """The next ``n`` PoolAcks mallory gets (answers and forgotten notices alike)."""
    got: list[p.PoolAck] = []
    end = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < end, f"{len(got)} of {n} PoolAcks reached mallory"
        try:
            msg = m._got.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(msg, p.PoolAck):
            got.append(msg)
    return got


def test_pool_announces_at_max_pools_do_not_scan_every_room(daemons, tmp_path: Path) -> None:
    pre = daemons("prefill", *FLAGS)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    m = Mallory(tmp_path, pre)

    def announce(i: int) -> None:
        m.send(p.PoolAnnounce(src=m.address, token="", pool_key=f"{m.address}#dec#{i}", layout=dl.to_dict(),
                              buffers=[(1 << 40) + b * dl.buffer_bytes for b in range(dl.num_buffers)],
                              session_id="127.0.0.1:1", prefill_engine_id="P"))

    try:
        with pre.client(timeout=60) as pc, pre.client(timeout=60) as probe:
            pc.register_pool(pl, ph, bootstrap=pre.address)
            key = f"{m.address}#dec#0"
            announce(0)
            assert m.expect(p.PoolAck).ok
            for r in range(ROOMS):
                m.send(p.TransferRequest(src=m.address, token="", room=r, transfer_id=r + 1, pool_key=key,
                                         prefill_engine_id="P", sender_rank=0, dst_indices=np.array([r]),
                                         dummy=False, deadline_s=120.0, inline_max_bytes=0))
            end = time.monotonic() + 60
            while not room_known(pc, ROOMS - 1):  # the last request made its room
                assert time.monotonic() < end, "mallory's requests did not make their rooms"
                time.sleep(0.2)
            for i in range(1, MAX_POOLS):  # up to peer.max_pools: no pool is forgotten yet
                announce(i)
            assert all(a.ok for a in _acks(m, MAX_POOLS - 1))
            time.sleep(1.0)
            with engine_lag(probe) as lat:
                t_flood = time.monotonic()
                for i in range(MAX_POOLS, MAX_POOLS + ANNOUNCES):
                    announce(i)
                acks = _acks(m, 2 * ANNOUNCES)  # each: its answer, and the notice of an idle pool forgotten
                flood_s = time.monotonic() - t_flood
            assert sum(a.ok for a in acks) == ANNOUNCES and sum(a.forgotten for a in acks) == ANNOUNCES
            assert room_known(pc, ROOMS - 1)  # the pool its rooms write into was never forgotten
        assert flood_s < 5.0, f"{ANNOUNCES} pool announces took {flood_s:.1f} s (one pass over the rooms each)"
        assert max(lat) < 1.0, f"an engine waited {max(lat):.1f} s while {ANNOUNCES} pool announces were handled"
    finally:
        m.close()
        ph.close()
