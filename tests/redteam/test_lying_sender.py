"""Red team: an authorized peer (mallory) is the "prefill directory" a decode engine was pointed
at, and then lies: empty or inconsistent topologies, and (as the sender it names) statuses that
do not match what it wrote.

Invariants: the decode room ends within its deadline with a reason; the decode pool outside the
room keeps its sentinel; the daemon keeps serving a fresh byte-exact room afterwards."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import RoomFailed
from kvd.layout import PoolLayout
from kvd.wire.codec import decode
from tools.cluster import free_port, peer_router, peer_socket

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
FLAGS = ("--timeouts-waiting-s", "6", "--timeouts-bootstrap-s", "4", "--timeouts-transfer-s", "6",
         "--timeouts-abort-fence-s", "2")
SENTINEL = 0x5A


class Mallory:
    """An authorized peer: one thread owns its sockets, answers heartbeats (so it looks alive),
    queues what it receives and sends what the test gives it."""

    def __init__(self, tmp: Path, target) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self._out = peer_socket(tmp, target.name, "mallory", self.address)
        self._out.connect(target.address)
        self._inbox = peer_router(tmp, "mallory", self.address)
        self._send: queue.Queue = queue.Queue()
        self._got: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            while not self._send.empty():
                self._out.send(self._send.get().encode())
            if self._inbox.poll(20):
                msg = decode(self._inbox.recv_multipart()[-1])
                if isinstance(msg, p.Heartbeat):
                    self._out.send(p.HeartbeatAck(src=self.address, token="", nonce=msg.nonce).encode())
                else:
                    self._got.put(msg)

    def send(self, msg) -> None:
        self._send.put(msg)

    def expect(self, kind: type, timeout: float = 10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                msg = self._got.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"no {kind.__name__} reached mallory")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._out.close()
        self._inbox.close()


def _fresh_room_works(pre, dec, pl: PoolLayout, dl: PoolLayout) -> None:
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    try:
        rng = np.random.default_rng(11)
        for b in range(pl.num_buffers):
            ph.buffer(b)[:] = rng.integers(0, 255, ph.buffer(b).shape, dtype=np.uint8)
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            dc.recv(did, 99, pre.address, pl.engine_id, [7, 8])
            pc.send(pid, 99, [2, 3], True, aux=b"fresh")
            assert dc.wait(99, timeout=20).aux == b"fresh"
        pb = pl.page_bytes
        for b in range(pl.num_buffers):
            assert np.array_equal(dh.buffer(b)[7 * pb:9 * pb], ph.buffer(b)[2 * pb:4 * pb])
    finally:
        ph.close()
        dh.close()


@pytest.mark.parametrize("case", ["empty", "tp_mismatch", "unknown_daemon"])
def test_a_lying_directory_fails_the_room_in_time(daemons, tmp_path: Path, case: str) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    dh = HostPool.create(dl)
    dh.fill(SENTINEL)
    m = Mallory(tmp_path, dec)
    try:
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
    finally:
        m.close()
        dh.close()


def test_a_sender_claiming_success_without_writing_fails_the_room(daemons, tmp_path: Path) -> None:
    _pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    dh = HostPool.create(dl)
    dh.fill(SENTINEL)
    m = Mallory(tmp_path, dec)
    try:
        with dec.client() as dc:
            did = dc.register_pool(dl, dh)
            dc.recv(did, 71, m.address, "P", [5, 6])
            m.expect(p.EngineQuery)
            m.send(p.EngineInfo(src=m.address, token="", engine_id="P", ready=True, tp_size=1,
                                layouts=[pl.to_dict()], daemons=[m.address]))
            ann = m.expect(p.PoolAnnounce)
            m.send(p.PoolAck(src=m.address, token="", pool_key=ann.pool_key, ok=True))
            req = m.expect(p.TransferRequest)
            m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                    pool_key=req.pool_key, sender_rank=0, ok=True, aux=b"lie",
                                    bytes_written=0, final=True))
            print('STATUS', dc.poll(71))
            with pytest.raises(RoomFailed):
                dc.wait(71, timeout=20)
    finally:
        m.close()
        dh.close()
