"""Red team (slow leak): a decode engine that crash-loops registers a new pool every time it comes
back, and each one is announced to the prefill daemon.

The prefill daemon kept every decode pool a peer ever announced (and the decode daemon every
announce it made) until one of the two daemons restarted: a crash-looping engine grew both
tables for as long as the daemons ran.

Invariants: the prefill daemon forgets a decode pool no room uses after ``peer.pool_idle_s`` and
keeps at most ``peer.max_pools`` per peer; the decode daemon forgets the announces of a pool its
engine dropped; a pool the prefill daemon forgot while its engine lives is announced again by
the next room. Every room succeeds byte-exact throughout. Real daemons over loopback."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE

pytestmark = pytest.mark.e2e

IDLE_S, MAX_POOLS = 1.0, 3
HEARTBEAT = ("--timeouts-heartbeat-interval-s", "0.25", "--timeouts-heartbeat-misses", "2")
GRACE_S = 2 * 0.25 * 2  # a forgotten pool stays usable for two heartbeat timeouts after the notice


def test_pool_churn_keeps_the_tables_bounded_and_rooms_exact(daemons) -> None:
    pre = daemons("prefill", *FLAGS, *HEARTBEAT, "--peer-pool-idle-s", str(IDLE_S),
                  "--peer-max-pools", str(MAX_POOLS))
    dec = daemons("decode", *FLAGS, *HEARTBEAT)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    rng = np.random.default_rng(5)
    for b in range(pl.num_buffers):
        ph.buffer(b)[:] = rng.integers(0, 255, ph.buffer(b).shape, dtype=np.uint8)
    ps = pl.page_size
    room = 0

    def one_room(dc, did: int, dh: HostPool, pc, pid: int) -> None:
        nonlocal room
        room += 1
        src, dst = [room % 16, (room + 5) % 16], [(room * 3) % 16, (room * 3 + 1) % 16]
        dc.recv(did, room, pre.address, "P", dst)
        pc.send(pid, room, src, True, aux=b"tok%d" % room)
        assert dc.wait(room, timeout=20).aux == b"tok%d" % room
        for b in range(pl.num_buffers):
            for s, d in zip(src, dst, strict=True):
                got, want = dh.buffer(b)[d * ps:(d + 1) * ps], ph.buffer(b)[s * ps:(s + 1) * ps]
                assert want.size and np.array_equal(got, want), f"room {room}: page {d} differs"

    try:
        with pre.client() as pc, dec.client() as steady:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
            sh = HostPool.create(dl)
            try:
                sid = steady.register_pool(dl, sh)  # an engine that lives through the churn
                one_room(steady, sid, sh, pc, pid)
                for i in range(8):  # a crash-looping engine: a new pool (key) each life
                    dh = HostPool.create(dl)
                    try:
                        with dec.client() as dc:
                            did = dc.register_pool(PoolLayout(f"D{i}", "decode", 1, 0, **SHAPE), dh)
                            one_room(dc, did, dh, pc, pid)
                    finally:
                        dh.close()
                    if i % 3 == 2:  # long enough for the prefill daemon to forget idle pools
                        time.sleep(IDLE_S + GRACE_S + 1.5)
                        one_room(steady, sid, sh, pc, pid)  # forgotten meanwhile: announced again
                time.sleep(0.5)  # the last engine's pool is reaped
                remote = pre.status()["daemon"]["remote_pools"]
                announces = dec.status()["daemon"]["pool_announces"]
                assert remote <= MAX_POOLS, f"the prefill daemon holds {remote} decode pools of one peer"
                assert announces <= 1, f"the decode daemon holds {announces} announces for 1 live pool"
                time.sleep(IDLE_S + GRACE_S + 1.5)
                assert pre.status()["daemon"]["remote_pools"] == 0
                one_room(steady, sid, sh, pc, pid)
                assert pre.status()["daemon"]["remote_pools"] == 1
                errors = dec.status()["daemon"]["errors"]
                assert not {k: v for k, v in errors.items() if k not in ("stale_message",)}, errors
            finally:
                sh.close()
    finally:
        ph.close()
