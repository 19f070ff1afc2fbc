"""Red team: a decode engine registers a tiny host pool with very many pages (one layer, one head,
head_dim 1, int8, page size 1: 2 MiB for 1 Mi pages) and opens room after room, each naming every
page of the pool as its destination, towards a prefill engine whose daemon (Mallory, an authorized
peer) answers heartbeats and nothing else, so that every room waits out its bootstrap timeout.

Each room was bounded on its own (at most its pool's pages), but not the rooms together: every
room keeps its destination indices (8 bytes each) until it ends, and a pool may hold its pages +
1,024 rooms, so one engine's 2 MiB pool let it make the daemon hold (pages + 1,024) x pages x 8
bytes (8 TiB for this pool; 48 rooms: +384 MiB here) for the bootstrap timeout, again and again.

Live rooms of one pool never share a destination page in a sane engine (two rooms writing one
page corrupt each other; an engine reuses a room's pages once it was released). Invariants (real
daemon): the destination indices of a pool's unreleased rooms together are at most
``DESTINATIONS_OVER_POOL`` times the pool's capacity (+ ``DESTINATIONS_SLACK``, for engines that
reuse pages early); a room past it is refused ``busy`` with a clear error and counted, the
daemon's memory does not grow with the rooms refused, a released room's share comes back, and
the daemon keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd.engineclient.client import KvdError
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.sides.receiver import DESTINATIONS_OVER_POOL
from tests.redteam.mallory import Mallory, rss_mib

pytestmark = pytest.mark.e2e

PAGES = 1 << 20
ROOMS = 48


def test_rooms_of_one_pool_cannot_name_more_destination_pages_than_it_has(daemons, tmp_path: Path) -> None:
    d = daemons("decode", "--timeouts-bootstrap-s", "60", "--timeouts-waiting-s", "60")
    dl = PoolLayout("D", "decode", 1, 0, num_layers=1, total_kv_heads=1, head_dim=1, dtype="int8",
                    page_size=1, num_pages=PAGES)
    m = Mallory(tmp_path, d)  # alive (heartbeats), never answers a query
    nowhere = m.address
    with HostPool.create(dl) as dh, d.client(timeout=30) as dc:
        did = dc.register_pool(dl, dh)
        before = rss_mib(d.proc.pid)
        pages = np.arange(PAGES, dtype=np.int64)
        accepted, refused = [], []
        for room in range(1, ROOMS + 1):
            try:
                dc.recv(did, room, nowhere, "P", pages)
                accepted.append(room)
            except KvdError as exc:
                refused.append((room, getattr(exc, "kind", ""), str(exc)))
        time.sleep(0.5)
        grown = rss_mib(d.proc.pid) - before
        assert grown < 96, (f"{len(accepted)} rooms of a {dl.pool_bytes >> 20} MiB pool, each naming all its "
                            f"{PAGES} pages, grew the daemon by {grown} MiB")
        assert len(accepted) == DESTINATIONS_OVER_POOL, accepted
        assert refused and all(kind == "busy" and "destination" in msg for _, kind, msg in refused), refused[:2]
        # The first room's share comes back once it is released: a new room of the whole pool goes in.
        dc.abort(did, accepted[0])
        assert dc.wait_released(accepted[0], timeout=10).released
        dc.recv(did, 1000, nowhere, "P", pages)
        errors = d.status()["daemon"]["errors"]
        assert errors.get("busy", 0) >= len(refused), errors
        assert d.alive()
    m.close()
