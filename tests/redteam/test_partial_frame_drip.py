"""Red team: local engine connections (one user, several connections) each start a large request
frame on the engine socket and then drip one more byte of it just inside
``socket.frame_timeout_s``, never finishing it.

The frame timeout was applied to each read, not to the frame: every dripped byte restarted it,
so each connection kept its partial frame (up to ``socket.max_frame_bytes``, 64 MiB by default)
in the daemon's memory for as long as the dripping went on: one user's
``socket.max_connections_per_uid`` connections, 16 GiB.

Invariants (real daemon): a request that started arriving arrives in full within
``socket.frame_timeout_s`` or its connection is closed, however its bytes trickle in, and the
closure is counted (``engine_partial_frame_timeout``); the daemon's memory does not keep the
partial frames; other engines are served meanwhile and after."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.redteam.mallory import rss_mib

pytestmark = pytest.mark.e2e

FRAME_TIMEOUT_S = 1.0
CONNS = 6
STARTED = 8 << 20  # bytes of each frame sent before the drip


def _closed(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        data = s.recv(1 << 16)
        return data == b""  # end of stream (an ErrorReply would come first otherwise)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def test_a_dripped_frame_is_cut_at_the_frame_timeout(daemons, tmp_path: Path) -> None:
    d = daemons("decode", "--socket-frame-timeout-s", str(FRAME_TIMEOUT_S))
    rss_before = rss_mib(d.proc.pid)
    socks = []
    for _ in range(CONNS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket_path)
        s.sendall(struct.pack(">I", 32 << 20) + b"\x00" * STARTED)
        socks.append(s)
    t0 = time.monotonic()
    open_at: dict[int, float] = {}
    while time.monotonic() - t0 < 4 * FRAME_TIMEOUT_S:
        time.sleep(FRAME_TIMEOUT_S / 3)  # one byte well inside each per-read timeout
        for i, s in enumerate(socks):
            if i in open_at:
                continue
            try:
                s.sendall(b"\x00")
            except OSError:
                open_at[i] = time.monotonic() - t0
                continue
            if _closed(s):
                open_at[i] = time.monotonic() - t0
    held = rss_mib(d.proc.pid) - rss_before
    for s in socks:
        s.close()
    errors = d.status()["daemon"]["errors"]
    still_open = CONNS - len(open_at)
    assert still_open == 0, (f"{still_open} of {CONNS} connections kept their partial frame "
                             f"{4 * FRAME_TIMEOUT_S:g} s (frame timeout {FRAME_TIMEOUT_S:g} s), "
                             f"daemon RSS +{held} MiB")
    assert max(open_at.values()) < FRAME_TIMEOUT_S + 1.5, open_at
    assert errors.get("engine_partial_frame_timeout", 0) >= CONNS, errors
    assert d.alive()
