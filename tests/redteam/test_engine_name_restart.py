"""Red team: another user (bob) takes the name of alice's engine while it restarts.

test_engine_name_other_uid refuses a rank of an engine whose other ranks another user holds. But
an engine with *no* live rank (all ranks restarting after a crash, or between a stop and a
start) was anyone's: bob registered "P" in that window and became the directory's prefill
engine "P" (decode requests for alice's rooms asked bob's pool; alice's restarted ranks were
refused, "another user").

Invariants: an engine name stays the uid's that last held it for ``socket.engine_name_grace_s``
after its last rank disconnects; another uid registering a rank of it inside the window is
refused ("forbidden", counted as ``engine_name_held``); alice re-registers it at once, and after
the window anyone may take it. Needs root (creates local users)."""

from __future__ import annotations

import time

import pytest

from kvd.client import KvdClient, KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.trust.localusers import need_root, run_as, start_daemon_as, user, workdir

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
GRACE = 3.0


def _register(sock: str, engine: str = "P") -> str:
    """Register rank 0 of prefill engine ``engine`` and disconnect (an engine that exits)."""
    lay = PoolLayout(engine, "prefill", 1, 0, **SHAPE)
    pool = HostPool.create(lay)
    try:
        with KvdClient(sock, timeout=10) as c:
            try:
                c.register_pool(lay, pool)
            except KvdError as exc:
                return f"refused: {exc.kind}: {exc}"
            return "registered"
    finally:
        pool.close()


def _wait_gone(d) -> None:
    """Until no pool is registered any more (the daemon saw the engine's disconnect)."""
    end = time.monotonic() + 10
    with d.client() as c:
        while c.status()["daemon"]["pools"]:
            assert time.monotonic() < end, "a pool stayed registered"
            time.sleep(0.05)


def test_a_restarting_engines_name_is_not_another_users_to_take() -> None:
    need_root()
    alice, bob = user("kvdt-alice"), user("kvdt-bob")
    d = start_daemon_as(None, workdir(), "--socket-engine-name-grace-s", str(GRACE))
    try:
        assert run_as(alice, _register, d.socket_path) == "registered"
        _wait_gone(d)
        took = run_as(bob, _register, d.socket_path)
        assert took.startswith("refused: forbidden"), f"bob (uid {bob.uid}) took alice's engine 'P': {took}"
        assert "engine_name_grace_s" in took
        assert run_as(bob, _register, d.socket_path, "Q") == "registered", "bob's own names are his"
        assert run_as(alice, _register, d.socket_path) == "registered", "alice's restart was refused"
        _wait_gone(d)
        time.sleep(GRACE + 0.5)  # past the grace from alice's second exit
        assert run_as(bob, _register, d.socket_path) == "registered", "the name was kept past its grace"
        with d.client() as c:
            errors = c.status()["daemon"]["errors"]
        assert errors.get("engine_name_held", 0) == 1, errors
    finally:
        d.stop()
