"""Red team: a decode engine that connects, starts 4,096 rooms, and goes away, over and over
(a crash loop, or a hostile engine user).

The daemon keeps the final events of each connection's latest 4,096 ended rooms for late polls
(``Daemon._ended_rooms``) and drops them when the connection goes (``engine_gone``). But the
rooms of a gone engine end *after* that, as they are failed and released, and each release
stores its event again, under the dead connection, where nothing ever removes it: ~2 MB per
disconnect here, for as long as the daemon runs.

Invariant: memory stays bounded. (The first 17 rounds fill the bounded table of recently
released transfer ids; only the 12 rounds after it are measured: the leak was ~2 MB a round, 24 MB
against the 16 MiB bound.)"""

from __future__ import annotations

import time

import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

ROOMS, WARM, ROUNDS = 4096, 17, 12



def test_rooms_of_engines_that_went_away_are_not_kept(daemons) -> None:
    dec = daemons("decode", *FLAGS)
    dl = PoolLayout("D", "decode", 1, 0, **{**SHAPE, "num_pages": ROOMS})  # a page per room: within its bound
    dh = HostPool.create(dl)
    try:
        def round_() -> None:
            with dec.client(timeout=60) as dc:
                did = dc.register_pool(dl, dh)
                for r in range(ROOMS):  # bootstrapping towards a directory that never answers
                    dc.recv(did, r, "tcp://127.0.0.1:9", "P", [r])

        for _ in range(WARM):
            round_()
        time.sleep(2.0)
        before = _rss_mib(dec.proc.pid)
        for _ in range(ROUNDS):
            round_()
        time.sleep(2.0)
        grown = _rss_mib(dec.proc.pid) - before
        assert dec.alive()
        assert grown < 16, f"the decode daemon grew {grown} MiB over {ROUNDS} engines that came and went"
    finally:
        dh.close()
