"""Red team: an engine of another user (bob) reads the rooms of alice's decode engine in status.

The status an engine reads lists "only its own uid's pools and rooms"; the pools are filtered by
pool id, but the rooms by (engine_id, rank, role) of the caller's pools, names an engine chooses
itself. Nothing stops two decode engines of different users from registering the same name, so
bob registers a decode pool named like alice's and sees her rooms: their ids (a prefill room id
is all a decode request needs to name the KV of a prompt), peers, bytes and ages.

Invariant: engines are kept apart (kvd.shell.local_access: "touch only their own pools and
rooms"; README: the status an engine reads lists only its own uid's pools and rooms).
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
SECRET_ROOM = 0x5EC12E7


def _alice(sock: str, bootstrap: str, ready: str, release: str) -> list[int]:
    lay = PoolLayout("D", "decode", 1, 0, **SHAPE)
    pool = HostPool.create(lay)
    try:
        with KvdClient(sock, timeout=10) as c:
            pid = c.register_pool(lay, pool)
            c.recv(pid, SECRET_ROOM, bootstrap, "P", [1, 2])  # waits for a prefill engine not there yet
            Path(ready).write_text("1")
            wait_file(release)
            return [r["room"] for r in c.status()["rooms"]]
    finally:
        pool.close()


def _bob(sock: str) -> dict[str, object]:
    lay = PoolLayout("D", "decode", 1, 0, **SHAPE)  # alice's engine name, his own pool
    pool = HostPool.create(lay)
    try:
        with KvdClient(sock, timeout=10) as c:
            try:
                c.register_pool(lay, pool)
            except KvdError as exc:  # the name is alice's while she holds it (test_engine_name_other_uid)
                return {"rooms": [], "visibility": f"own pools: registration refused ({exc.kind})"}
            st = c.status()
            return {"rooms": [r["room"] for r in st["rooms"]], "visibility": st.get("visibility", "all")}
    finally:
        pool.close()


def test_an_engine_of_another_uid_does_not_see_rooms_of_an_engine_with_the_same_name(tmp_path) -> None:
    need_root()
    alice, bob = user("kvdt-alice"), user("kvdt-bob")
    base = workdir()
    d = start_daemon_as(None, base, "--timeouts-bootstrap-s", "20", "--timeouts-waiting-s", "20")
    try:
        ready, release = str(base / "ready"), str(base / "release")
        holder = start_as(alice, _alice, d.socket_path, d.address, ready, release)
        wait_file(ready)
        seen = run_as(bob, _bob, d.socket_path)
        Path(release).write_text("1")
        assert holder.result() == [SECRET_ROOM], "alice does not see her own room"
        assert "own pools" in str(seen["visibility"])
        assert SECRET_ROOM not in seen["rooms"], f"bob (uid {bob.uid}) reads alice's rooms: {seen['rooms']}"
    finally:
        d.stop()
