"""Red team: one local user (mallory) in the socket group opens 200 connections to the descriptor
hand-over socket (``<socket.path>.fds``) and sends nothing on any of them.

The hand-over server serves 64 connections at once, each waiting up to 5 s for its descriptor,
and the rest wait in the listen backlog (128), then the kernel refuses new connections. The
engine socket bounds connections per uid (test_connection_hog); this one did not: every other
user's pool registration waited behind mallory's silent connections (10 s here, forever for a
user who keeps reconnecting), and an engine's hand-over (its client's timeout) failed.

Invariants: one uid holds at most ``MAX_INFLIGHT_PER_UID`` hand-overs in flight; its next
connection is refused at once (counted as ``fd_handover_busy``); another user (alice) hands over
her pool's descriptor and registers at once. Needs root (creates local users)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kvd.client import KvdClient, KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.shell.fd_inbox import MAX_INFLIGHT_PER_UID
from kvd.wire import fdmsg
from tests.trust.localusers import need_root, run_as, start_as, start_daemon_as, user, wait_file, workdir

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="bfloat16", page_size=4, num_pages=4)
SILENT = 200


def _hog(sock: str, ready: str, release: str) -> int:
    """Open up to ``SILENT`` silent hand-over connections; hold them until ``release``. Returns
    how many the daemon still kept open (not refused) when released."""
    held: list[socket.socket] = []
    try:
        for _ in range(SILENT):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(fdmsg.fd_socket_path(sock))
            except BlockingIOError:  # the backlog is full
                s.close()
                break
            held.append(s)
        time.sleep(0.5)  # the daemon accepts what it will
        Path(ready).write_text("1")
        wait_file(release)
        open_ = 0
        for s in held:
            try:
                open_ += s.recv(256) == b""  # closed with no reply: never refused
            except BlockingIOError:
                open_ += 1  # nothing said yet: still held
            except OSError:
                pass
        return open_
    finally:
        for s in held:
            s.close()


def _register(sock: str) -> tuple[str, float]:
    lay = PoolLayout("alice-0", "decode", 1, 0, **SHAPE)
    pool = HostPool.create(lay)
    t0 = time.monotonic()
    try:
        with KvdClient(sock, timeout=8) as c:
            c.register_pool(lay, pool)
            return "registered", time.monotonic() - t0
    except KvdError as exc:
        return f"refused: {exc.kind}: {exc}", time.monotonic() - t0
    finally:
        pool.close()


def test_one_user_cannot_hold_every_descriptor_hand_over() -> None:
    need_root()
    mallory, alice = user("kvdt-mallory"), user("kvdt-alice")
    base = workdir()
    d = start_daemon_as(None, base)
    try:
        ready, release = str(base / "hog-ready"), str(base / "hog-release")
        hog = start_as(mallory, _hog, d.socket_path, ready, release)
        wait_file(ready)
        got, took = run_as(alice, _register, d.socket_path)
        Path(release).write_text("1")
        held = hog.result()
        assert got == "registered", f"alice (uid {alice.uid}) was locked out by mallory's hand-overs: {got}"
        assert took < 2.0, f"alice's registration waited {took:.1f} s behind mallory's silent hand-overs"
        assert held <= MAX_INFLIGHT_PER_UID, f"mallory held {held} hand-overs in flight"
        with d.client() as c:
            errors = c.status()["daemon"]["errors"]
        assert errors.get("fd_handover_busy", 0) >= SILENT // 2, errors
    finally:
        d.stop()
