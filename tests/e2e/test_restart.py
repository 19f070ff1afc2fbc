"""Caches that heal (issue 12, item 4) with real daemons: a prefill daemon restarted on the same
port while idle serves later rooms from an existing decode daemon, which is not restarted, and
the decode daemon counts the restart (the prefill daemon's new incarnation)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from kvd.hostpool import HostPool
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

BASE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)


def _pool(layout: PoolLayout, seed: int | None) -> HostPool:
    pool = HostPool.create(layout)
    if seed is None:
        pool.fill(0xAB)
    else:
        rng = np.random.default_rng(seed)
        for i in range(layout.num_buffers):
            buf = pool.buffer(i)
            buf[...] = rng.integers(0, 256, buf.shape, dtype=np.uint8)
    return pool


def _two_rooms_around_a_restart(daemons, flags: tuple[str, ...], first_room: int, pause_s: float):
    """A room, the prefill daemon restarted on the same port (after ``pause_s``), a second room
    from the same decode daemon and engine: both byte-exact. Returns both daemons."""
    pre = daemons("prefill", *flags)
    dec = daemons("decode", *flags)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **BASE), PoolLayout("D", "decode", 1, 0, **BASE)
    made: list[HostPool] = []
    try:
        dh = _pool(dl, None)
        made.append(dh)
        with dec.client() as dc:
            did = dc.register_pool(dl, dh.memory)
            for attempt, seed in enumerate((1, 2)):
                ph = _pool(pl, seed)
                made.append(ph)
                with pre.client() as pc:
                    pid = pc.register_pool(pl, ph.memory, bootstrap=pre.address)
                    room = first_room + attempt
                    dc.recv(did, room, pre.address, "P", [5, 6])
                    pc.send(pid, room, [1, 2], True, aux=b"ok%d" % attempt)
                    assert dc.wait(room, timeout=20).aux == b"ok%d" % attempt, dec.log_tail()
                    for b in range(pl.num_buffers):
                        assert np.array_equal(ph.buffer(b)[4:12], dh.buffer(b)[20:28])
                if attempt == 0:  # restart the prefill daemon on the same port
                    port = pre.port
                    pre.stop()
                    time.sleep(pause_s)
                    pre = daemons("prefill", *flags, "--peer-port", str(port))
                    pre = dataclasses.replace(pre, port=port)
        assert dec.alive() and pre.alive()
        return pre, dec
    finally:
        for pool in made:
            pool.close()
            pool.unlink()


def test_prefill_daemon_restarted_on_the_same_port_serves_existing_decode_daemons(daemons):
    """Before: every later room failed with 'decode pool ... was never announced' (a stale
    announce cache in the decode daemon)."""
    flags = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8")
    _two_rooms_around_a_restart(daemons, flags, 10, 2.0)  # idle past the heartbeat window (3 x 0.5 s)


def test_a_prefill_daemon_restarted_inside_the_heartbeat_window_costs_no_room(daemons):
    """Restarted and serving again at once, inside the decode daemon's heartbeat window: the decode
    daemon learns of the new incarnation from its answers (``peer_restarted``) or, if its cached
    acceptance of the pool still looks current when it asks, from the new daemon's ``pool_unknown``
    refusal (it announces again and asks once more: tests/sides/test_pair.py); either way the
    first room after the restart succeeds byte-exact."""
    flags = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
             "--timeouts-heartbeat-interval-s", "2")  # a window the restart fits well inside
    _, dec = _two_rooms_around_a_restart(daemons, flags, 20, 0.0)
    errors = dec.status()["daemon"]["errors"]
    assert set(errors) <= {"pool_announced_again", "peer_restarted", "stale_message"}, errors
