"""Red team: a decode engine that connects, starts 4,096 rooms, and goes away, over and over
(a crash loop, or a hostile engine user).

The daemon keeps the final events of each connection's latest 4,096 ended rooms for late polls
(``Daemon._ended_rooms``) and drops them when the connection goes (``engine_gone``). But the
rooms of a gone engine end *after* that, as they are failed and released, and each release
stored its event again, under the dead connection, where nothing ever removed it: ~2 MB per
disconnect, for as long as the daemon runs (first found as RSS growth: 24 MB over 12 rounds).

Invariant: once the engines are gone and their rooms have ended, the daemon keeps no event of
theirs (``ended_events_kept`` in its status: what it holds, not an RSS reading that needs
dozens of rounds to stand out of the allocator's noise), and it keeps serving."""

from __future__ import annotations

import time

import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE

pytestmark = pytest.mark.e2e

ROOMS, ROUNDS = 4096, 3


def test_rooms_of_engines_that_went_away_are_not_kept(daemons) -> None:
    dec = daemons("decode", *FLAGS)
    dl = PoolLayout("D", "decode", 1, 0, **{**SHAPE, "num_pages": ROOMS})  # a page per room: within its bound
    dh = HostPool.create(dl)
    try:
        for _ in range(ROUNDS):
            with dec.client(timeout=60) as dc:
                did = dc.register_pool(dl, dh)
                for r in range(ROOMS):  # bootstrapping towards a directory that never answers
                    dc.recv(did, r, "tcp://127.0.0.1:9", "P", [r])
                # While the engine is here, its rooms' events are its own to keep (none ended yet).
        deadline = time.monotonic() + 30
        while (status := dec.status())["rooms"] or status["daemon"]["pools"]:
            assert time.monotonic() < deadline, "the gone engines' rooms did not end"
            time.sleep(0.2)
        kept = status["daemon"]["ended_events_kept"]
        assert kept == {"connections": 0, "events": 0, "aux_bytes": 0}, kept
        assert dec.alive()
        # A live engine's ended rooms are kept for its late polls, and counted.
        with dec.client(timeout=60) as dc:
            did = dc.register_pool(dl, dh)
            dc.recv(did, 1, "tcp://127.0.0.1:9", "P", [1])
            dc.abort(did, 1)
            dc.wait_released(1, timeout=20)
            assert dc.poll(1).released
            kept = dec.status()["daemon"]["ended_events_kept"]
            assert kept["connections"] == 1 and kept["events"] == 1, kept
    finally:
        dh.close()
