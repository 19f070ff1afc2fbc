"""Red team: one local user registers tiny host pools (16 one-byte pages each) one after the other
on one engine connection, each under a new engine name, and never stops.

Nothing bounded how many pools a user may hold: each is a mapping of the daemon's (one memory
map entry) registered with Mooncake and every receive session, and the daemon's registry is
scanned per registration and per peer request. About 550 a second here: the kernel's limit of
65,530 maps per process (``vm.max_map_count``) in two minutes, after which no engine of any
user can register a pool and the daemon's own large allocations fail.

Invariants (real daemon): one uid holds at most ``socket.max_pools_per_uid`` pools (closing ones
included: they are still mapped); a registration past it is refused ``busy`` with a clear error
and counted, and nothing more is mapped; once the connection closes (its pools reaped) the uid
registers again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd.core.config import Config
from kvd.engineclient.client import KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

LIMIT = getattr(Config(), "socket_max_pools_per_uid", 1024)  # (the default; before the bound: none)


def _maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def test_one_user_cannot_register_pools_without_end(daemons, tmp_path: Path) -> None:
    d = daemons("decode")
    refused: list[tuple[str, str]] = []
    with d.client(timeout=30) as dc:
        maps = _maps(d.proc.pid)
        for i in range(LIMIT + 16):
            dl = PoolLayout(f"hoard-{i}", "decode", 1, 0, num_layers=1, total_kv_heads=1, head_dim=1,
                            dtype="int8", page_size=1, num_pages=16)
            pool = HostPool.create(dl)
            try:
                dc.register_pool(dl, pool)
            except KvdError as exc:
                refused.append((getattr(exc, "kind", ""), str(exc)))
            finally:
                pool.close()  # the daemon keeps its own mapping
        grown = _maps(d.proc.pid) - maps
        assert len(refused) == 16, f"{LIMIT + 16 - len(refused)} pools registered by one uid (limit {LIMIT})"
        assert all(kind == "busy" and "max_pools_per_uid" in msg for kind, msg in refused), refused[:2]
        assert grown <= LIMIT + 64, f"the daemon's memory maps grew by {grown}"
        assert d.status()["daemon"]["errors"].get("busy", 0) >= 16
    # The connection's pools go with it: the uid registers again.
    dl = PoolLayout("D", "decode", 1, 0, num_layers=1, total_kv_heads=1, head_dim=1, dtype="int8",
                    page_size=1, num_pages=16)
    with d.client(timeout=30) as dc, HostPool.create(dl) as pool:
        for _ in range(100):
            try:
                dc.register_pool(dl, pool)
                break
            except KvdError:  # the closed connection's pools are still being reaped
                time.sleep(0.1)
        else:
            raise AssertionError("the uid could not register a pool after its connection closed")
    assert d.alive()
