"""Red team: an authorized peer (mallory, a second "decode daemon") speaks about a room that a
legitimate decode daemon is also receiving from the same prefill engine.

The invariant: a peer may only speak for its own transfers; another daemon's room is unaffected
(byte-exact, success) whatever mallory asks for, reports or aborts about its own transfer."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tools.cluster import free_port, peer_socket

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
FLAGS = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
         "--timeouts-abort-fence-s", "2")
SENTINEL = 0x5A


def _setup(daemons):
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    rng = np.random.default_rng(5)
    for b in range(pl.num_buffers):
        ph.buffer(b)[:] = rng.integers(0, 255, ph.buffer(b).shape, dtype=np.uint8)
    dh.fill(SENTINEL)
    return pre, dec, pl, dl, ph, dh


def _mallory(tmp: Path, pre, dl: PoolLayout):
    mallory = f"tcp://127.0.0.1:{free_port()}"
    s = peer_socket(tmp, "prefill", "mallory", mallory)
    s.connect(pre.address)
    key = f"{mallory}#evil#1"
    s.send(p.PoolAnnounce(src=mallory, token="", pool_key=key, layout=dl.to_dict(),
                          buffers=[(1 << 40) + i * dl.buffer_bytes for i in range(dl.num_buffers)],
                          session_id="127.0.0.1:1", prefill_engine_id="P").encode())
    return s, mallory, key


def _exact(dh: HostPool, ph: HostPool, pl: PoolLayout, src: list[int], dst: list[int]) -> None:
    pb = pl.page_bytes
    for b in range(pl.num_buffers):
        got, want = dh.buffer(b), ph.buffer(b)
        for s, d in zip(src, dst, strict=True):
            assert np.array_equal(got[d * pb:(d + 1) * pb], want[s * pb:(s + 1) * pb])


def _run(daemons, tmp_path: Path, attack) -> None:
    pre, dec, pl, dl, ph, dh = _setup(daemons)
    try:
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            s, mallory, key = _mallory(tmp_path, pre, dl)
            time.sleep(0.5)
            dc.recv(did, 60, pre.address, "P", [5, 6])
            time.sleep(1.0)  # the legitimate request is at the prefill daemon
            attack(s, mallory, key)
            time.sleep(0.5)
            pc.send(pid, 60, [1, 2], True, aux=b"tok")
            st = dc.wait(60, timeout=20)
            assert st.aux == b"tok"
            _exact(dh, ph, pl, [1, 2], [5, 6])
            s.close()
    finally:
        ph.close()
        dh.close()


def test_a_bad_request_of_another_peer_for_the_same_room_does_not_fail_it(daemons, tmp_path: Path) -> None:
    def attack(s, mallory, key):
        s.send(p.TransferRequest(src=mallory, token="", room=60, transfer_id=777, pool_key=key,
                                 prefill_engine_id="P", sender_rank=0, dst_indices=np.array([9999]),
                                 dummy=False, deadline_s=5.0).encode())
    _run(daemons, tmp_path, attack)


def test_another_peer_aborting_its_own_transfer_of_the_room_does_not_fail_it(daemons, tmp_path: Path) -> None:
    def attack(s, mallory, key):
        s.send(p.TransferRequest(src=mallory, token="", room=60, transfer_id=778, pool_key=key,
                                 prefill_engine_id="P", sender_rank=0, dst_indices=np.array([3, 4]),
                                 dummy=False, deadline_s=5.0).encode())
        time.sleep(0.3)
        s.send(p.AbortTransfer(src=mallory, token="", room=60, transfer_id=778, pool_key=key,
                               sender_rank=0, reason="mine").encode())
    _run(daemons, tmp_path, attack)
