"""Red team: an unauthenticated network client that reaches ``metrics.address`` opens every
/metrics slot (``HTTP_MAX_CONNECTIONS``) and drips its request into each, a header byte every
second, never finishing it.

test_metrics_flood cuts off a *silent* connection after ``HTTP_TIMEOUT_S``, but that timeout was
per read: a byte a second restarted it, so the dripping connections held every slot (and a thread
each) for as long as the client liked (a header line may be 64 KiB: hours per connection), and
every scrape was refused (``metrics_busy``).

Invariant: a /metrics connection gets ``HTTP_TIMEOUT_S`` in all to send its request and take its
reply; a dripping one is cut off then, and a scrape is answered again."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from kvd.obs.metrics import HTTP_MAX_CONNECTIONS, HTTP_TIMEOUT_S
from tests.redteam.mallory import FLAGS
from tools.cluster import free_port

pytestmark = pytest.mark.e2e


def test_dripping_metrics_connections_are_cut_off(daemons, tmp_path: Path) -> None:
    port = free_port()
    dec = daemons("decode", *FLAGS, "--metrics-address", f"127.0.0.1:{port}")
    drips = []
    try:
        for _ in range(HTTP_MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Drip: ")
            drips.append(s)
        t0 = time.monotonic()
        cut: set[int] = set()
        while len(cut) < len(drips) and time.monotonic() - t0 < HTTP_TIMEOUT_S + 3:
            time.sleep(0.25)
            for i, s in enumerate(drips):
                if i in cut:
                    continue
                try:
                    s.setblocking(False)
                    if s.recv(64) == b"":  # the daemon closed it
                        cut.add(i)
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    cut.add(i)
                    continue
                s.setblocking(True)
                s.sendall(b"a")  # one more byte of a header that never ends
        took = time.monotonic() - t0
        assert len(cut) == len(drips), f"{len(drips) - len(cut)} dripping connections still held after {took:.1f} s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"kvd_rooms" in r.read()
    finally:
        for s in drips:
            s.close()
    assert dec.alive()
