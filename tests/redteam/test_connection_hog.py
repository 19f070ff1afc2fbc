"""Red team: one local user (mallory) in the socket group opens engine connections and registers a
small pool on each, until the daemon's ``socket.max_connections`` are all his.

A connection holding a pool is never evicted (it is an engine), so every later connection of any
user got "busy": one user locked every other user's engines out of the daemon.

Invariants: one uid holds at most ``socket.max_connections_per_uid`` connections; its next one
is refused with a "busy" error naming that limit (counted as ``engine_conn_per_uid``); another
user (alice) still connects and registers. Needs root (creates local users)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvd.client import KvdClient, KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire.codec import decode
from kvd.wire.engine import ErrorReply
from kvd.wire.framing import FrameBuffer
from tests.trust.localusers import need_root, run_as, start_as, start_daemon_as, user, wait_file, workdir

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="bfloat16", page_size=4, num_pages=4)
PER_UID, ALL = 3, 5


def _hog(sock: str, pools_n: int, extra: int, ready: str, release: str) -> list[str]:
    """Register ``pools_n`` pools, one connection each, then open ``extra`` more connections and
    read what the daemon says first; hold everything until ``release``."""
    held, pools, out = [], [], []
    try:
        for i in range(pools_n):
            lay = PoolLayout(f"hog-{i}", "decode", 1, 0, **SHAPE)
            pool = HostPool.create(lay)
            pools.append(pool)
            c = KvdClient(sock, timeout=10)
            held.append(c)
            c.register_pool(lay, pool)
            out.append("registered")
        for _ in range(extra):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(10)
            raw.connect(sock)
            frames = FrameBuffer()
            while (payload := frames.next_payload()) is None:
                data = raw.recv(65536)
                if not data:
                    break
                frames.feed(data)
            raw.close()
            msg = decode(payload) if payload is not None else None
            out.append(f"refused: {msg.kind}: {msg.message}" if isinstance(msg, ErrorReply) else f"got {msg!r}")
        Path(ready).write_text("1")
        wait_file(release)
        return out
    finally:
        for c in held:
            c.close()
        for pool in pools:
            pool.close()


def _register(sock: str) -> str:
    lay = PoolLayout("alice-0", "decode", 1, 0, **SHAPE)
    pool = HostPool.create(lay)
    try:
        with KvdClient(sock, timeout=10) as c:
            c.register_pool(lay, pool)
            return "registered"
    except KvdError as exc:
        return f"refused: {exc.kind}: {exc}"
    finally:
        pool.close()


def test_one_user_cannot_take_every_engine_connection() -> None:
    need_root()
    mallory, alice = user("kvdt-mallory"), user("kvdt-alice")
    base = workdir()
    d = start_daemon_as(None, base, "--socket-max-connections", str(ALL),
                        "--socket-max-connections-per-uid", str(PER_UID))
    try:
        ready, release = str(base / "hog-ready"), str(base / "hog-release")
        hog = start_as(mallory, _hog, d.socket_path, PER_UID, ALL - PER_UID, ready, release)
        wait_file(ready)
        got = run_as(alice, _register, d.socket_path)
        Path(release).write_text("1")
        tries = hog.result()
        assert tries[:PER_UID] == ["registered"] * PER_UID, tries
        assert all(t.startswith("refused: busy") and "max_connections_per_uid" in t for t in tries[PER_UID:]), tries
        assert got == "registered", f"alice (uid {alice.uid}) was locked out by mallory's connections: {got}"
        with d.client() as c:
            errors = c.status()["daemon"]["errors"]
        assert errors.get("engine_conn_per_uid", 0) == ALL - PER_UID, errors
    finally:
        d.stop()
