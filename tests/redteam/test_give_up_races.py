"""Red team: the decode side's give-up (AbortTransfer naming the prefill engine, protocol 7) and
the prefill side's memory of rooms that ended before any request, against reissued room ids,
late give-ups and hostile reasons. Uses the in-memory transport and peers of tests/sides/pair.py
(no sockets, no Mooncake)."""

from __future__ import annotations

import pytest

from kvd.core.rooms import MAX_REASON
from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import Transfer


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


def _give_up(t: Transfer, room: int, *, reason: str = "aborted by the decode engine", rank: int = 0,
             transfer_id: int = 4242, src: str | None = None) -> None:
    pool = t.dst[0][0]
    t.cluster.send(src or t.decode.address, t.prefill.address, wp.AbortTransfer(
        room=room, transfer_id=transfer_id, pool_key=pool.key, sender_rank=rank, reason=reason,
        prefill_engine_id="prefill-0"))


def _released(t: Transfer, room: int) -> list[str]:
    return [ev.state for _, ev in t.decode.events if ev.released and ev.room == room]


async def test_a_peers_long_give_up_reason_is_cut_before_it_is_kept(cluster):
    """A give-up for a room the engine has not started is remembered (4,096 rooms) with its
    reason, which is then the reason of the engine's failed room and of the answer to a late
    request. The peer's reason was kept whole: up to peer.max_message_bytes (64 MiB) per entry,
    4,096 entries. In-memory transport and peers."""
    t = Transfer(cluster, 1, 1)
    junk = "x" * (1 << 20)
    for room in range(1, 9):
        _give_up(t, room, reason=junk, transfer_id=1000 + room)
    await cluster.settle()
    kept = t.prefill.senders._ended_unasked
    assert kept, "the give-ups were not remembered"
    assert all(len(reason) <= MAX_REASON for reason, _, _ in kept.values()), \
        max(len(r) for r, _, _ in kept.values())
    t.recv(room=1)  # a late request is answered with the kept reason: bounded too
    await cluster.settle()
    statuses = [m for m in cluster.sent(wp.TransferStatus) if m.room == 1]
    assert statuses and all(len(m.reason) <= MAX_REASON + 200 for m in statuses), len(statuses[0].reason)
