"""Red team: a local engine (any process that may connect to the socket) writes 2,000
StatusRequests in one 24 KB write and never reads a reply, while the daemon holds 400 rooms.

The engine server answers every frame of one read before it waits for the engine to read
(``writer.drain()`` once per read), so the replies to one read are all buffered: a status is a
snapshot of every room the caller may see (~40 KB here for 12 bytes asked: the caller's own
rooms only, for any user but root and kvd's own), so one 24 KB write cost ~80 MB of daemon
memory, held for as long as the engine kept the connection open without reading (one read
takes up to 1 MiB: 87,000 requests, gigabytes), per connection.

Invariants: what the daemon buffers for a connection that does not read stays bounded (past
``socket.max_frame_bytes`` of unread replies it stops reading that connection's requests until
the engine reads, here 1 MiB); every request is still answered, in order, once the engine
reads; other engines are served meanwhile (a fresh byte-exact room)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire.codec import decode
from kvd.wire.engine import StatusReply, StatusRequest
from kvd.wire.framing import frame
from tests.redteam.mallory import FLAGS, SHAPE, _fresh_room_works
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

ROOMS, BURST = 400, 2000
ROOMS_SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="uint8", page_size=1, num_pages=ROOMS)



def _replies(s: socket.socket, count: int) -> list[int]:
    """Read ``count`` replies; their req_ids, in order."""
    buf, ids = b"", []
    while len(ids) < count:
        data = s.recv(1 << 20)
        assert data, "the daemon closed the connection"
        buf += data
        while len(buf) >= 4 and len(buf) >= 4 + (size := int.from_bytes(buf[:4], "big")):
            msg = decode(buf[4:4 + size])
            buf = buf[4 + size:]
            assert isinstance(msg, StatusReply), msg
            ids.append(msg.req_id)
    return ids


def test_replies_an_engine_does_not_read_are_bounded(daemons, tmp_path: Path) -> None:
    flags = (*FLAGS, "--socket-max-frame-bytes", "1M")
    pre, dec = daemons("prefill", *flags), daemons("decode", *flags)
    pl = PoolLayout("Q", "prefill", 1, 0, **ROOMS_SHAPE)
    ph = HostPool.create(pl)
    try:
        with pre.client(timeout=60) as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            for r in range(ROOMS):  # rooms waiting for their decode requests: a busy prefill node
                pc.send(pid, r, np.array([r]), False, wait=False)
            assert pc.poll(ROOMS - 1).state == "bootstrapping"
            size = len(frame(StatusReply(req_id=1, status=pc.status()).encode()))
            assert size * BURST > 64 << 20  # what answering the whole read at once would buffer
            before = _rss_mib(pre.proc.pid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(pre.socket_path)
                s.sendall(b"".join(frame(StatusRequest(req_id=i + 1).encode()) for i in range(BURST)))
                # The daemon answers what it may buffer and waits for us; watch it while we do not read.
                grown, end = 0, time.monotonic() + 10
                while time.monotonic() < end and grown < 64:
                    grown = max(grown, _rss_mib(pre.proc.pid) - before)
                    time.sleep(0.2)
                assert grown < 64, f"{BURST} unread status replies cost the daemon {grown} MiB"
                _fresh_room_works(pre, dec, PoolLayout("P", "prefill", 1, 0, **SHAPE),
                                  PoolLayout("D", "decode", 1, 0, **SHAPE))
                s.settimeout(120)
                assert _replies(s, BURST) == list(range(1, BURST + 1))  # all answered, in order
    finally:
        ph.close()
