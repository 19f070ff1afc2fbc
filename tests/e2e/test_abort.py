"""Abort and release: a decode engine may reuse its pages only once no write can land.

Real daemons, real Mooncake TCP. A room is aborted while a large chunk is on the wire;
after kvd says "released" the destination pages must never change again."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from kvd.client import KvdError, RoomFailed
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=4, total_kv_heads=8, head_dim=128, dtype="bfloat16", page_size=16, num_pages=512)


def _pools():
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    rng = np.random.default_rng(3)
    for b in range(pl.num_buffers):
        ph.buffer(b)[...] = rng.integers(1, 256, ph.buffer(b).shape, dtype=np.uint8)
    dh.fill(0)
    return pl, dl, ph, dh


def _snapshot(pool: HostPool, layout: PoolLayout) -> list[np.ndarray]:
    return [pool.buffer(b).copy() for b in range(layout.num_buffers)]


def test_no_byte_lands_after_release(pair):
    pre_d, dec_d = pair
    pl, dl, ph, dh = _pools()
    try:
        with pre_d.client() as pc, dec_d.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre_d.address)
            did = dc.register_pool(dl, dh)
            for room in range(3):
                dc.recv(did, room, pre_d.address, "P", np.arange(512))
            deadline = time.monotonic() + 10
            while any(dc.poll(r).state == "bootstrapping" for r in range(3)) and time.monotonic() < deadline:
                time.sleep(0.02)
            for room in range(3):
                pc.send(pid, room, np.arange(256), False)  # 3 x 64 MiB on the wire
            for room in range(3):
                dc.abort(did, room)
            snaps = []
            for room in range(3):
                released = dc.wait_released(room, timeout=30)
                assert released.state == "failed" and "aborted" in released.reason
            snaps = _snapshot(dh, dl)
            for room in range(3):
                # The prefill engine carries on, unaware: its chunks must go nowhere.
                with contextlib.suppress(KvdError):
                    pc.send(pid, room, np.arange(256, 512), True)
            time.sleep(1.5)
            after = _snapshot(dh, dl)
            assert all(np.array_equal(a, b) for a, b in zip(snaps, after, strict=True)), \
                "bytes landed in released pages"
            # The pages were released and can be reused: the same room id works again.
            dh.fill(0)
            dc.recv(did, 0, pre_d.address, "P", np.arange(8))
            pc.send(pid, 0, np.arange(100, 108), True, aux=b"again")
            assert dc.wait(0, timeout=20).aux == b"again"
            for b in range(pl.num_buffers):
                tok = pl.page_size
                assert np.array_equal(dh.buffer(b)[:8 * tok], ph.buffer(b)[100 * tok:108 * tok])
    finally:
        for h in (ph, dh):
            h.close()
            h.unlink()


def test_prefill_abort_fails_decode_room(pair):
    pre_d, dec_d = pair
    pl, dl, ph, dh = _pools()
    try:
        with pre_d.client() as pc, dec_d.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre_d.address)
            did = dc.register_pool(dl, dh)
            dc.recv(did, 1, pre_d.address, "P", np.arange(4))
            pc.send(pid, 1, np.arange(2), False)
            deadline = time.monotonic() + 10
            while dc.poll(1).state != "transferring" and time.monotonic() < deadline:
                time.sleep(0.02)
            pc.abort(pid, 1)
            with pytest.raises(RoomFailed, match="aborted by the prefill engine"):
                dc.wait(1, timeout=20)
            assert dc.wait_released(1, timeout=20).released
    finally:
        for h in (ph, dh):
            h.close()
            h.unlink()
