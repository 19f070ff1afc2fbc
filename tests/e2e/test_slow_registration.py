"""A pool whose registration blocks (GPU memory: a CUDA IPC open and a Mooncake registration per
region, up to a second each on the H100 host) must not stop the daemon serving everyone else.

The decode daemon runs with every Mooncake registration slowed to 2 s while a flag file exists
(``slow_register/sitecustomize.py``). While one engine registers a pool, another engine's room
goes end to end, byte-exact, and polls are answered without the registration's wait; an engine
that disconnects during its registration leaves no pool behind, and the daemon keeps serving."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvd.core.layout import PoolLayout
from kvd.engineclient.replies import KvdError
from kvd.hostpool import HostPool
from tests.redteam.mallory import FLAGS, SHAPE, _fresh_room_works, engine_lag

pytestmark = pytest.mark.e2e
SLOW_S = 2.0


def _engines(status: dict) -> list[str]:
    return sorted(p["layout"].split()[1] for p in status["daemon"]["pools"])


def test_a_slow_registration_does_not_hold_other_engines(daemons, tmp_path: Path) -> None:
    flag = tmp_path / "slow"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "slow_register"),
                                          os.environ.get("PYTHONPATH", "")]),
           "SLOW_REGISTER_FLAG": str(flag), "SLOW_REGISTER_S": str(SLOW_S)}
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS, env=env)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    late = [PoolLayout(name, "decode", 1, 0, **SHAPE) for name in ("late", "gone")]
    pools = [HostPool.create(x) for x in (pl, dl, *late)]
    ph, dh = pools[0], pools[1]
    rng = np.random.default_rng(5)
    for b in range(pl.num_buffers):
        ph.buffer(b)[:] = rng.integers(0, 255, ph.buffer(b).shape, dtype=np.uint8)
    try:
        with pre.client() as pc, dec.client() as dc, dec.client() as probe, dec.client() as lc, \
                dec.client() as gc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            dc.recv(did, 6, pre.address, "P", [3, 4])  # opens the prefill peer's receive session
            pc.send(pid, 6, [1, 2], True, aux=b"before")
            assert dc.wait(6, timeout=20).aux == b"before"
            flag.touch()  # from here on every registration on the decode daemon takes 2 s
            took: dict[str, float | str] = {}

            def register(name: str, client, layout: PoolLayout, pool: HostPool) -> None:
                t0 = time.monotonic()
                try:
                    client.register_pool(layout, pool)
                    took[name] = time.monotonic() - t0
                except (KvdError, OSError) as exc:
                    took[name] = f"{type(exc).__name__}: {exc}"

            slow = threading.Thread(target=register, args=("late", lc, late[0], pools[2]))
            gone = threading.Thread(target=register, args=("gone", gc, late[1], pools[3]))
            with engine_lag(probe) as lag:
                slow.start()
                gone.start()
                time.sleep(0.3)
                gc.close()  # this engine goes away while its registration is in flight
                t0 = time.monotonic()
                dc.recv(did, 7, pre.address, "P", [3, 4])
                pc.send(pid, 7, [1, 2], True, aux=b"meanwhile")
                assert dc.wait(7, timeout=20).aux == b"meanwhile"
                room_s = time.monotonic() - t0
                slow.join(30)
                gone.join(30)
            flag.unlink()
            assert isinstance(took["late"], float) and took["late"] >= SLOW_S, took
            assert room_s < SLOW_S, f"the room took {room_s:.2f} s beside a {SLOW_S} s registration"
            assert lag and max(lag) < SLOW_S / 2, f"polls waited up to {max(lag):.2f} s"
            ps = pl.page_size
            for b in range(pl.num_buffers):
                assert np.array_equal(dh.buffer(b)[3 * ps:5 * ps], ph.buffer(b)[1 * ps:3 * ps])
            deadline = time.monotonic() + 3 * SLOW_S  # the gone engine's registration finishes, then is undone
            while "gone" in _engines(dec.status()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _engines(dec.status()) == ["D", "late"]
            dc.recv(did, 8, pre.address, "P", [5, 6])  # and the daemon keeps serving
            pc.send(pid, 8, [1, 2], True, aux=b"after")
            assert dc.wait(8, timeout=20).aux == b"after"
    finally:
        for pool in pools:
            pool.close()


def test_a_stop_does_not_wait_for_every_queued_registration(daemons, tmp_path: Path) -> None:
    """SIGTERM while engines' registrations queue on the registrar: the stop waited for every one
    of them (2 s each here, up to a second per GPU region on the H100 host), with the event loop
    blocked in the registrar's shutdown, so the 10-s stop bound and a second signal did nothing.
    Only the registration under way is waited for; the queued ones are refused."""
    flag = tmp_path / "slow"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "slow_register"),
                                          os.environ.get("PYTHONPATH", "")]),
           "SLOW_REGISTER_FLAG": str(flag), "SLOW_REGISTER_S": str(SLOW_S)}
    dec = daemons("decode", *FLAGS, env=env)
    layouts = [PoolLayout(f"E{i}", "decode", 1, 0, **SHAPE) for i in range(5)]
    pools = [HostPool.create(x) for x in layouts]
    outcome: dict[int, str] = {}

    def register(i: int) -> None:
        try:
            with dec.client(timeout=60) as c:
                outcome[i] = f"pool {c.register_pool(layouts[i], pools[i])}"
        except (KvdError, OSError) as exc:
            outcome[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(layouts))]
    try:
        flag.touch()
        for t in threads:
            t.start()
        time.sleep(0.5)  # one registration under way, four queued
        t0 = time.monotonic()
        dec.proc.terminate()
        dec.proc.wait(30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(10)
        assert dec.proc.returncode == 0, dec.log_tail(10)
        assert took < SLOW_S + 2.5, f"the stop took {took:.1f} s behind {len(layouts)} queued registrations"
        assert len(outcome) == len(layouts), outcome  # every engine heard an answer
        assert dec.log().count('"pool_registered"') <= 1  # the one under way at most
    finally:
        for pool in pools:
            pool.close()


def test_a_registration_whose_engine_left_is_undone_or_never_carried_out(daemons, tmp_path: Path) -> None:
    """The engine server read nothing while a registration was being worked on, so an engine that
    left (crashed, or gave up waiting) still had its queued registration carried out in full on
    the one registrar thread, ahead of every engine behind it, and its pool adopted for nobody.
    Now the work is cancelled when the connection ends: a queued registration never runs, one
    under way is undone once done; the engine behind them waits for neither."""
    slow = 1.5
    flag = tmp_path / "slow"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "slow_register"),
                                          os.environ.get("PYTHONPATH", "")]),
           "SLOW_REGISTER_FLAG": str(flag), "SLOW_REGISTER_S": str(slow)}
    dec = daemons("decode", *FLAGS, env=env)
    layouts = {name: PoolLayout(name, "decode", 1, 0, **SHAPE) for name in ("underway", "queued", "late")}
    pools = {name: HostPool.create(x) for name, x in layouts.items()}
    clients = {name: dec.client(timeout=30) for name in layouts}
    took: dict[str, float | str] = {}

    def register(name: str) -> None:
        t0 = time.monotonic()
        try:
            clients[name].register_pool(layouts[name], pools[name])
            took[name] = time.monotonic() - t0
        except (KvdError, OSError) as exc:
            took[name] = f"{type(exc).__name__}: {exc}"

    # One registration first, so what a daemon opens once (torch, a CUDA driver's descriptors, the
    # staging pool) is in the baseline: the check is for descriptors left per registration.
    warm = HostPool.create(PoolLayout("warm", "decode", 1, 0, **SHAPE))
    with dec.client() as wc:
        wc.register_pool(warm.layout, warm)
    deadline = time.monotonic() + 5
    while _engines(dec.status()) and time.monotonic() < deadline:
        time.sleep(0.1)
    warm.close()
    fds = len(os.listdir(f"/proc/{dec.proc.pid}/fd"))
    threads = {name: threading.Thread(target=register, args=(name,)) for name in layouts}
    try:
        flag.touch()
        for name in ("underway", "queued"):
            threads[name].start()
            time.sleep(0.2)
        # Both engines leave, one's registration under way, the other's waiting its turn (as a
        # crash would: the socket shut; close() would wait for the request's lock).
        for name in ("underway", "queued"):
            clients[name]._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        time.sleep(0.1)
        threads["late"].start()
        for t in threads.values():
            t.join(30)
        assert isinstance(took["late"], float) and isinstance(took["queued"], str), took
        # Behind the one under way only (slow - 0.5 s), then its own: not behind the queued one too.
        assert took["late"] < 2 * slow, f"the late registration took {took['late']:.2f} s (slow {slow} s)"
        assert _engines(dec.status()) == ["late"]
        assert "decode queued" not in dec.log()  # never registered, not even for a moment
        flag.unlink()
        clients["late"].close()
        deadline = time.monotonic() + 5
        while _engines(dec.status()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _engines(dec.status()) == []
        assert dec.log().count("pool_registration_undone") == 1  # the one under way, released
        assert len(os.listdir(f"/proc/{dec.proc.pid}/fd")) <= fds + 1  # the status connection at most
        _fresh_room_works(daemons("prefill", *FLAGS), dec, PoolLayout("P", "prefill", 1, 0, **SHAPE),
                          PoolLayout("D", "decode", 1, 0, **SHAPE))
    finally:
        for c in clients.values():
            c.close()
        for pool in pools.values():
            pool.close()
