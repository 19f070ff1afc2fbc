"""Local trust with real users (needs root to create them): the confused deputy refused, a daemon
and its engines as different non-root users (host pools by descriptor), engines of different
users kept apart, and the uid allow-list."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.client import KvdClient, KvdError
from kvd.engineclient.fdpass import FdPassError, hand_over
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.trust.localusers import need_root, run_as, start_as, start_daemon_as, user, workdir
from tools.cluster import make_plan
from tools.fake_engine import build_layout, run_decode_rank, run_prefill_rank

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
DL = PoolLayout("D", "decode", 1, 0, **SHAPE)
OFFSETS = [i * DL.buffer_bytes for i in range(DL.num_buffers)]
SIZE = DL.buffer_bytes * DL.num_buffers


def _raw_register(sock: str, memory: dict) -> str:
    """RegisterPool exactly as given (no client-side hand-over): the daemon's answer."""
    with KvdClient(sock, timeout=10) as c:
        try:
            c._request(p.RegisterPool(req_id=c._t.next_req_id(), layout=DL.to_dict(), memory=memory),
                       p.PoolRegistered)
        except KvdError as exc:
            return f"refused: {exc}"
    return "registered"


def _client_register(sock: str, memory: dict) -> str:
    with KvdClient(sock, timeout=10) as c:
        try:
            c.register_pool(DL, memory)
        except KvdError as exc:
            return f"refused: {exc}"
    return "registered"


def _deputy_attempts(sock: str, secret: str, victim: str, ticket: str) -> dict[str, str]:
    link = f"kvdt-link-{os.getpid()}"
    os.symlink(victim, f"/dev/shm/{link}")
    own = f"/var/tmp/kvdt-own-{os.getpid()}"
    fd = os.open(own, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    out = {
        "name_secret": _raw_register(sock, {"kind": "shm", "name": secret, "offsets": OFFSETS}),
        "name_link": _raw_register(sock, {"kind": "shm", "name": link, "offsets": OFFSETS}),
        "client_secret": _client_register(sock, {"kind": "shm", "name": secret, "offsets": OFFSETS}),
        "client_link": _client_register(sock, {"kind": "shm", "name": link, "offsets": OFFSETS}),
        "fd_number": _raw_register(sock, {"kind": "fd", "fd": 0, "ticket": ticket, "offsets": OFFSETS}),
        "foreign_ticket": _raw_register(sock, {"kind": "fd", "ticket": ticket, "offsets": OFFSETS}),
    }
    try:
        hand_over(sock, fd)
        out["disk_fd"] = "accepted"
    except FdPassError as exc:
        out["disk_fd"] = f"refused: {exc}"
    os.close(fd)
    os.unlink(own)
    os.unlink(f"/dev/shm/{link}")
    return out


def test_confused_deputy_attempts_are_refused(tmp_path) -> None:
    need_root()
    mallory = user("kvdt-mallory")
    base = workdir()
    d = start_daemon_as(None, base)  # the daemon runs as root, as in the issue
    secret = HostPool.create(DL, name=f"kvdt-secret-{os.getpid()}")  # root's, 0600
    secret.fill(0x53)
    victim = f"/var/tmp/kvdt-victim-{os.getpid()}"
    with open(victim, "wb") as f:
        f.write(b"V" * SIZE)
    os.chmod(victim, 0o600)
    try:
        fd = os.open(f"/dev/shm/{secret.name}", os.O_RDWR)
        ticket = hand_over(d.socket_path, fd)  # root's own descriptor, waiting under root's ticket
        os.close(fd)
        got = run_as(mallory, _deputy_attempts, d.socket_path, secret.name, victim, ticket)
        assert all(v.startswith("refused") for v in got.values()), got
        assert "named by a shared-memory segment are refused" in got["name_secret"]
        assert "named by a shared-memory segment are refused" in got["name_link"]
        assert "Permission denied" in got["client_secret"]  # the engine opens it with its own rights
        assert "Too many levels of symbolic links" in got["client_link"]  # and never through a symlink
        assert "descriptor number" in got["fd_number"]
        assert "no descriptor was handed over under this ticket by this user" in got["foreign_ticket"]
        assert "not tmpfs" in got["disk_fd"]
        # Nothing read, nothing written: the sentinels are intact and root's ticket still works.
        assert (np.frombuffer(secret._shm.buf, np.uint8) == 0x53).all()  # type: ignore[union-attr]
        with open(victim, "rb") as f:
            assert f.read() == b"V" * SIZE
        with d.client() as c:
            assert c._request(p.RegisterPool(req_id=c._t.next_req_id(), layout=DL.to_dict(), memory={
                "kind": "fd", "ticket": ticket, "offsets": OFFSETS}), p.PoolRegistered).pool_id >= 1
            errors = c.status()["daemon"]["errors"]
        assert errors.get("registration", 0) >= 4 and errors.get("fd_handover_refused", 0) >= 1, errors
    finally:
        d.stop()
        secret.close()
        os.unlink(victim)


def _prefill(sock: str, bootstrap: str, plan: list, go: str) -> object:
    lay = build_layout("prefill", "P", 1, 0, 2, 4, 8, "bfloat16", 4, 32)
    r = run_prefill_rank(sock, lay, plan, seed=7, chunk_pages=2, bootstrap=bootstrap, timeout=30,
                         on_ready=lambda _pool: _wait_file(go))
    return (r.ok, r.rooms_ok, r.error, r.rooms_failed)


def _decode(sock: str, bootstrap: str, plan: list, go: str) -> object:
    lay = build_layout("decode", "D", 1, 0, 2, 4, 8, "bfloat16", 4, 32)
    r = run_decode_rank(sock, lay, plan, bootstrap, "P", 4, seed=7, timeout=30,
                        on_ready=lambda _pool: _wait_file(go))
    return (r.ok, r.rooms_ok, r.bytes, r.mismatches[:3], r.error, r.rooms_failed)


def _wait_file(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _hold_pool(sock: str, ready: str, release: str) -> int:
    lay = build_layout("prefill", "Q", 1, 0, 2, 4, 8, "bfloat16", 4, 32)
    pool = HostPool.create(lay)
    with KvdClient(sock, timeout=10) as c:
        pool_id = c.register_pool(lay, pool, bootstrap="")
        with open(ready, "w") as f:
            f.write(str(pool_id))
        _wait_file(release)
        status = c.status()
    pool.close()
    assert [x["pool_id"] for x in status["daemon"]["pools"]] == [pool_id], status["daemon"]["pools"]
    return pool_id


def _intrude(sock: str, pool_id: int) -> dict[str, object]:
    with KvdClient(sock, timeout=10) as c:
        out: dict[str, object] = {}
        for name, call in (("abort", lambda: c.abort(pool_id, 1)), ("send", lambda: c.send(pool_id, 1, [0], True)),
                           ("poll", lambda: c.poll(1))):
            try:
                call()
                out[name] = "allowed"
            except KvdError as exc:
                out[name] = exc.kind
        st = c.status()
        out["pools_seen"] = [x["pool_id"] for x in st["daemon"]["pools"]]
        out["visibility"] = st.get("visibility", "all")
    return out


def test_daemon_and_engines_as_three_non_root_users(tmp_path) -> None:
    """The shipped unit's situation: kvd runs as its own user, engines as others, host pools are
    0600 files of the engine users, and handed over as descriptors they work."""
    need_root()
    daemon_user, alice, bob = user("kvdt-daemon"), user("kvdt-alice"), user("kvdt-bob")
    outsider = user("kvdt-eve")
    base = workdir()
    d = start_daemon_as(daemon_user, base, "--socket-allow-uids", f"{alice.uid},{bob.uid}")
    try:
        plan = make_plan(2, 3, 32, 32)
        go = str(base / "go")
        prefill = start_as(alice, _prefill, d.socket_path, d.address, plan, go)
        decode = start_as(bob, _decode, d.socket_path, d.address, plan, go)
        time.sleep(2.0)
        open(go, "w").close()
        assert prefill.result()[:3] == (True, 2, ""), d.log()[-3000:]
        ok, rooms_ok, nbytes, mismatches, error, _ = decode.result()
        assert ok and rooms_ok == 2 and nbytes > 0 and not mismatches and not error, d.log()[-3000:]
        log = d.log()
        assert '"pool_fd_received"' in log and f'"peer_uid": {alice.uid}' in log and f'"peer_uid": {bob.uid}' in log
        assert '"memory": "fd"' in log, log[-3000:]  # both pools were handed over, not opened by name
        assert "Permission denied" not in log
        # Bob cannot touch, or see, Alice's pool and rooms.
        ready, release = str(base / "ready"), str(base / "release")
        holder = start_as(alice, _hold_pool, d.socket_path, ready, release)
        _wait_file(ready)
        pool_id = int(Path(ready).read_text())
        seen = run_as(bob, _intrude, d.socket_path, pool_id)
        # (the poll names the pool Bob's refused send tried: protocol 6 polls a room on its pool)
        assert seen["abort"] == "unknown_pool" and seen["send"] == "unknown_pool" and seen["poll"] == "unknown_pool"
        assert seen["pools_seen"] == [] and "own pools" in str(seen["visibility"])
        open(release, "w").close()
        assert holder.result() == pool_id
        # Eve is in the socket's group but not in socket.allow_uids.
        assert run_as(outsider, _status_kind, d.socket_path) in ("forbidden", "connection")
        assert '"engine_connection_refused"' in d.log() and "socket.allow_uids" in d.log()
    finally:
        d.stop()


def _status_kind(sock: str) -> str:
    try:
        with KvdClient(sock, timeout=10) as c:
            c.status()
    except KvdError as exc:
        return exc.kind
    return "allowed"
