"""What the red-team tests share: an authorized peer that lies (mallory), the cluster shape,
and the check that a daemon still serves a fresh byte-exact room afterwards."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvd import protocol as p
from kvd.engineclient.client import KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire.codec import decode
from tools.cluster import free_port, peer_router, peer_socket

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

    def take_room(self, prefill_layout: PoolLayout):
        """Play the directory and the only sender of a room the decode daemon asked about:
        answer its query, accept its pool, and return its TransferRequest (and the announce)."""
        self.expect(p.EngineQuery)
        self.send(p.EngineInfo(src=self.address, token="", engine_id=prefill_layout.engine_id, ready=True,
                               tp_size=1, layouts=[prefill_layout.to_dict()], daemons=[self.address]))
        ann = self.expect(p.PoolAnnounce)
        self.send(p.PoolAck(src=self.address, token="", pool_key=ann.pool_key, ok=True))
        return self.expect(p.TransferRequest), ann

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._out.close()
        self._inbox.close()


@dataclass
class Scene:
    """Both daemons, the cluster's layouts, a sentinel-filled decode host pool and Mallory."""

    pre: Any
    dec: Any
    pl: PoolLayout
    dl: PoolLayout
    dh: HostPool
    m: Mallory


@contextlib.contextmanager
def mallory_scene(daemons, tmp_path: Path) -> Iterator[Scene]:
    """The red-team set-up: daemons with ``FLAGS``, the decode pool filled with ``SENTINEL``
    (registered by the test), and Mallory, an authorized peer posing as the prefill side."""
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    dh = HostPool.create(dl)
    dh.fill(SENTINEL)
    m = Mallory(tmp_path, dec)
    try:
        yield Scene(pre, dec, PoolLayout("P", "prefill", 1, 0, **SHAPE), dl, dh, m)
    finally:
        m.close()
        dh.close()


def room_known(client: Any, room: int) -> bool:
    """Whether the daemon has a room of this id for the client's engine (a poll answers it)."""
    try:
        client.poll(room)
    except KvdError:
        return False
    return True


@contextlib.contextmanager
def engine_lag(probe: Any) -> Iterator[list[float]]:
    """Round-trip times of another engine's polls (of a room that does not exist), every 10 ms
    while the block runs: how long the daemon's event loop kept engines waiting."""
    lat: list[float] = []
    stop = threading.Event()

    def lag() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(KvdError):
                probe.poll(10**9)
            lat.append(time.monotonic() - t0)
            time.sleep(0.01)

    prober = threading.Thread(target=lag)
    prober.start()
    try:
        yield lat
    finally:
        stop.set()
        prober.join()


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
        ps = pl.page_size  # a buffer is [tokens, heads, head bytes]: pages are page_size rows
        for b in range(pl.num_buffers):
            got, want = dh.buffer(b)[7 * ps:9 * ps], ph.buffer(b)[2 * ps:4 * ps]
            assert want.size and np.array_equal(got, want), f"buffer {b}: the fresh room's pages differ"
    finally:
        ph.close()
        dh.close()


def rss_mib(pid: int) -> int:
    """Resident memory of a process, in MiB (what the hoard tests bound)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")
