"""Red team: a prefill engine opens rooms no decode daemon asks for: one page each, 20,000 of
them, on a pool of 16 pages.

Nothing bounds the rooms of a pool: each SendChunk of a new room id makes a sender room that
waits ``timeouts.waiting_s`` (300 s by default) for its receivers, and here they cost ~3 KiB
each (40,000 rooms: +120 MiB in 5 s on this machine, so ~7 GiB over the 300 s an engine can keep
it up), besides housekeeping's pass over every room ten times a second. Every room holds at
least one page of its pool (a zero-page room is the exception), so a pool has at most about as
many rooms in flight as it has pages. The same holds for decode rooms (RecvRoom) and for rooms
a peer's TransferRequests create.

Invariant: memory and the event loop stay bounded; bad input gets a clear error. This file is a
failing test only: where to bound (per pool, per connection, per peer) is the maintainers' call;
the bound asserted here is generous (the pool's pages plus 1,024)."""

from __future__ import annotations

import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdError
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE

pytestmark = pytest.mark.e2e

ROOMS = 20_000


def test_a_pool_has_a_bounded_number_of_rooms_in_flight(daemons) -> None:
    pre = daemons("prefill", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    try:
        with pre.client(timeout=60) as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            opened = 0
            for room in range(ROOMS):
                try:
                    pc.send(pid, room, [1], False)
                except KvdError:
                    break
                opened += 1
            in_flight = len(pc.status()["rooms"])
        assert opened <= pl.num_pages + 1024, (f"{opened} rooms ({in_flight} in flight) accepted on a pool of "
                                               f"{pl.num_pages} pages")
    finally:
        ph.close()
