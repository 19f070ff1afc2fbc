"""Red team: an unauthenticated network client that reaches ``metrics.address`` opens 48
connections to /metrics and sends each one the first line of a request, then nothing more.

The endpoint was prometheus_client's ``start_http_server``: a threading WSGI server that starts
one thread per connection and reads with no timeout, so every silent connection held a thread
of the daemon (and a descriptor) for as long as the client kept it open: 48 connections here,
as many as the client likes in general, until the daemon cannot start a thread (its executor,
Mooncake) or open a descriptor (engines, peers) any more.

Invariants: the daemon's threads stay bounded whatever the client holds open (at most
``HTTP_MAX_CONNECTIONS`` serve /metrics at once; a connection past them is closed at once and
counted as ``metrics_busy``); a silent connection is cut off after ``HTTP_TIMEOUT_S``; a scrape
works again once they are, and engines are served throughout (a fresh byte-exact room)."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from kvd.layout import PoolLayout
from kvd.obs.metrics import HTTP_MAX_CONNECTIONS, HTTP_TIMEOUT_S
from tests.redteam.mallory import FLAGS, SHAPE, _fresh_room_works
from tools.cluster import free_port

pytestmark = pytest.mark.e2e

HELD = 48


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_silent_metrics_connections_hold_no_thread_each(daemons, tmp_path: Path) -> None:
    port = free_port()
    pre = daemons("prefill", *FLAGS)
    dec = daemons("decode", *FLAGS, "--metrics-address", f"127.0.0.1:{port}")
    assert "kvd_rooms" in _scrape(port)
    before = _threads(dec.proc.pid)
    held = []
    try:
        for _ in range(HELD):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            held.append(s)
        # Every connection has been accepted (or refused) once a later one is answered: wait for
        # the server to have seen them all, then count the daemon's threads.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = socket.create_connection(("127.0.0.1", port), timeout=5)
            probe.settimeout(5)
            try:
                probe.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                got = probe.recv(64)
            except OSError:
                got = b""
            finally:
                probe.close()
            if got == b"":  # closed at once: every slot is held
                break
        grown = _threads(dec.proc.pid) - before
        assert grown <= HTTP_MAX_CONNECTIONS, f"{HELD} silent connections cost the daemon {grown} threads"
        _fresh_room_works(pre, dec, PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE))
        # The silent ones are cut off: a scrape is answered again, and it counts the refusals.
        deadline = time.monotonic() + HTTP_TIMEOUT_S + 20
        text = ""
        while time.monotonic() < deadline and not text:
            try:
                text = _scrape(port)
            except OSError:
                time.sleep(0.2)
        assert "kvd_rooms" in text
        busy = [line for line in text.splitlines() if line.startswith('kvd_errors_total{kind="metrics_busy"}')]
        assert busy and float(busy[0].split()[-1]) >= 1
        assert _threads(dec.proc.pid) - before <= HTTP_MAX_CONNECTIONS
    finally:
        for s in held:
            s.close()
    assert dec.alive()
