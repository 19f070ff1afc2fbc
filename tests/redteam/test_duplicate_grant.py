"""Red team (duplicate messages): a decode daemon's StagingGrant reaches the prefill daemon twice
(same room, same writer, same chunk and offset).

The sender side took the second copy for "chunk granted twice" and failed the room: a
duplicated message (a retransmit, a replay by anyone on the path) cost a good transfer.

Invariants: an identical duplicate changes nothing (counted as ``duplicate_message`` and
dropped; the room is byte-exact and succeeds); a grant naming *another* region for a chunk
already granted still fails the room with a reason that says so.

In process: the room sides of tests/sides/pair.py, in-memory peer messages and the memcpy
transport (no daemons, no sockets)."""

from __future__ import annotations

import dataclasses

from kvd.wire import engine as we
from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import Transfer


async def _staged_room(replay) -> tuple[Cluster, Transfer]:
    cluster = Cluster()
    t = Transfer(cluster, 2, 1, staged=True, pages=12)
    grants: list[wp.StagingGrant] = []
    cluster.hold = lambda d: isinstance(d.msg, wp.StagingGrant) and not grants.append(d.msg)
    t.recv()
    await cluster.settle()
    assert grants, "the receiver granted regions before any chunk"
    cluster.release_held()
    for msg in replay(grants):  # after the originals, as a late copy would come
        t.prefill.route(msg)
    cluster.hold = lambda d: False
    await cluster.settle()
    t.send(chunks=3)
    await cluster.settle()
    return cluster, t


async def test_an_identical_duplicate_grant_is_counted_and_dropped() -> None:
    cluster, t = await _staged_room(lambda grants: list(grants))
    try:
        event = t.decode_events()[0]
        assert event is not None and event.state == "success", event
        assert t.verify() == []
        assert t.prefill.errors["duplicate_message"] >= 1
        assert t.prefill.errors["bad_peer_message"] == 0
        assert t.decode._stage.whole and t.prefill._stage.whole
    finally:
        await cluster.close()


async def test_a_duplicate_after_its_chunk_was_written_is_dropped_too() -> None:
    """The copy arrives after the chunk's write (the grant is no longer pending at the sender)."""
    cluster = Cluster()
    t = Transfer(cluster, 2, 1, staged=True, pages=12)
    try:
        t.recv()
        await cluster.settle()
        first = cluster.sent(wp.StagingGrant)[0]
        for pool, _ in t.src:  # the first chunk's pages only: chunk 0 is written, the room goes on
            t.prefill.senders.on_chunk(pool, we.SendChunk(req_id=1, pool_id=pool.pool_id, room=1,
                                                          pages=t.src_pages[:4], is_last=False, page_offset=0))
        await cluster.settle()
        assert [m.chunk for m in cluster.sent(wp.ChunkWritten)] == [0, 0]
        t.prefill.route(first)
        await cluster.settle()
        for pool, _ in t.src:
            t.prefill.senders.on_chunk(pool, we.SendChunk(req_id=1, pool_id=pool.pool_id, room=1,
                                                          pages=t.src_pages[4:], is_last=True, aux=b"first-token",
                                                          page_offset=4))
        await cluster.settle()
        assert t.decode_events()[0].state == "success"
        assert t.verify() == []
        assert t.prefill.errors["duplicate_message"] == 1
    finally:
        await cluster.close()


async def test_a_conflicting_grant_still_fails_the_room_with_the_reason() -> None:
    cluster, t = await _staged_room(
        lambda grants: [dataclasses.replace(grants[0], offset=grants[0].offset + 64)])
    try:
        event = t.decode_events()[0]
        assert event is not None and event.state == "failed", event
        assert t.prefill.errors["bad_peer_message"] == 1
        failed = [m for m in cluster.sent(wp.TransferStatus) if m.final and not m.ok]
        assert any("granted twice" in m.reason for m in failed), [m.reason for m in failed]
    finally:
        await cluster.close()
