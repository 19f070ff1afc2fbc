"""Red team: an engine of another user (bob) registers the missing prefill rank of alice's engine.

Alice's prefill engine "P" runs TP 2; rank 0 is registered, rank 1 not yet (it starts later, or
is restarting). Engine ids are names an engine chooses, and a registration is refused only when
the same rank is registered already, so bob registers "P" rank 1 with his own pool and becomes
the directory's rank 1: every decode request for a room of "P" now asks bob's pool for half of
the heads, bob sees those rooms (and their ids) in his status, and what he sends with them lands
in alice's decode engines. Alice's own rank 1 is then refused ("already registered").

Invariant: engines of different users are kept apart ("touch only their own pools and rooms"):
a rank of an engine whose other ranks another user holds here is refused.
Needs root (creates local users)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd.client import KvdClient, KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.trust.localusers import need_root, run_as, start_as, start_daemon_as, user, wait_file, workdir

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)


def _register(sock: str, rank: int, ready: str = "", release: str = "") -> str:
    lay = PoolLayout("P", "prefill", 2, rank, **SHAPE)
    pool = HostPool.create(lay)
    try:
        with KvdClient(sock, timeout=10) as c:
            try:
                c.register_pool(lay, pool)
            except KvdError as exc:
                return f"refused: {exc.kind}"
            if ready:
                Path(ready).write_text("1")
                wait_file(release)
            return "registered"
    finally:
        pool.close()


def test_a_rank_of_another_users_engine_is_refused(tmp_path) -> None:
    need_root()
    alice, bob = user("kvdt-alice"), user("kvdt-bob")
    base = workdir()
    d = start_daemon_as(None, base)
    try:
        ready, release = str(base / "ready"), str(base / "release")
        holder = start_as(alice, _register, d.socket_path, 0, ready, release)
        wait_file(ready)
        took = run_as(bob, _register, d.socket_path, 1)
        Path(release).write_text("1")
        assert holder.result() == "registered"
        assert took.startswith("refused"), f"bob (uid {bob.uid}) registered rank 1 of alice's prefill engine 'P'"
    finally:
        d.stop()
