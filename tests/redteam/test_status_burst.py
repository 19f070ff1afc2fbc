"""Red team: a local engine (any process that may connect to the socket, kvctl's user
included) writes a burst of StatusRequests, 300 of them in one 3 KB write, while the daemon
holds 4,000 rooms in flight.

A status is a snapshot of every room (built in full before it is filtered to the caller's
uid), tens of ms at this size, and the engine server answers every frame of one read back to
back without yielding to the event loop: the burst holds the loop for seconds (8,000 rooms
and 400 statuses: 13.6 s on this machine), longer than the peers' heartbeat window (their
rooms fail, the daemon is declared dead) and the systemd watchdog's housekeeping limit.
PollRooms do the same at a smaller cost each (every poll scans the room tables).

Invariant: the event loop stays responsive (another engine's round trip stays short)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire.engine import StatusRequest
from kvd.wire.framing import frame

pytestmark = pytest.mark.e2e

ROOMS, BURST = 4000, 300
SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="uint8", page_size=1, num_pages=ROOMS)
FLAGS = ("--timeouts-waiting-s", "120", "--timeouts-bootstrap-s", "60", "--timeouts-transfer-s", "120")


def test_a_burst_of_status_requests_does_not_hold_the_loop(daemons) -> None:
    pre = daemons("prefill", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    try:
        with pre.client(timeout=120) as pc, pre.client(timeout=120) as other:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            for r in range(ROOMS):  # rooms waiting for their decode requests: a busy prefill node
                pc.send(pid, r, np.array([r]), False, wait=False)
            assert pc.poll(ROOMS - 1).state == "bootstrapping"
            lat: list[float] = []
            stop = threading.Event()

            def probe() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    other.status()
                    lat.append(time.monotonic() - t0)
                    time.sleep(0.02)

            prober = threading.Thread(target=probe)
            prober.start()
            time.sleep(0.3)
            burst = b"".join(frame(StatusRequest(req_id=i + 1).encode()) for i in range(BURST))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(pre.socket_path)
                s.sendall(burst)  # 3 KB: the socket buffer takes it; replies are read below
                s.settimeout(120)
                got = 0
                while got < BURST:
                    data = s.recv(1 << 20)
                    assert data, "the daemon closed the connection"
                    got += data.count(b"inline_writes_total")  # a key of every status reply
            time.sleep(0.3)
            stop.set()
            prober.join()
        assert max(lat) < 2.0, f"another engine waited {max(lat):.1f} s for a status while the burst was answered"
    finally:
        ph.close()
