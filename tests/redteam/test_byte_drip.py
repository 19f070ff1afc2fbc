"""Red team: an authorized peer, a sender a decode room names, writes nothing but sends a
non-final TransferStatus that reports one byte more than the last, just before each deadline.

A status that moves no bytes no longer restarts the room's deadline (test_empty_progress), but
one new byte does: the room stayed "transferring" for up to ``bytes_owed`` statuses, one
transfer timeout each (for a 1 GiB room, longer than any engine waits).

Invariants: a sender rank's progress statuses are bounded by the room's destination indices
(each written batch fills at least one) plus slack; past that the room fails with the reason,
counted as ``status_flood``, and is released; the pool keeps its canary. Within that bound the
room still ends at its lifetime (``timeouts.room_s``), which progress never restarts.

In process: the room sides of tests/sides/pair.py, in-memory peer messages and the memcpy
transport (no daemons, no sockets); the test's clock stands for time passing."""

from __future__ import annotations

from kvd.sides.receiver import STATUS_SLACK
from kvd.wire import engine as we
from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import CANARY, Transfer


async def test_a_byte_per_status_cannot_keep_a_room_alive() -> None:
    cluster = Cluster()
    t = Transfer(cluster, 1, 1, pages=6)
    try:
        t.recv()
        await cluster.settle()
        rr = next(iter(t.decode.receivers.rooms.values()))
        link = rr.senders[0]
        assert link.bytes_owed > 1000, "the room is owed far more bytes than the bound allows statuses"
        limit = len(rr.dst_indices) + STATUS_SLACK
        sent = 0
        for n in range(1, 1000):
            if rr.machine.state.final:
                break
            cluster.clock.advance(cluster.config.transfer_timeout_s * 0.9)  # just inside the deadline
            cluster.expire()
            t.decode.route(wp.TransferStatus(src=t.prefill.address, token="", room=rr.room,
                                             transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=0,
                                             ok=True, bytes_written=n, final=False))
            sent = n
        assert rr.machine.state.final, "the room is still live after 1,000 one-byte statuses"
        assert sent == limit + 1, f"failed after {sent} statuses, the bound is {limit}"
        assert t.decode.errors["status_flood"] == 1
        assert "progress statuses" in (rr.machine.reason or "")
        await cluster.settle()
        for _, arrays in t.dst:
            assert (arrays.array == CANARY).all()
    finally:
        await cluster.close()


async def test_a_drip_within_the_status_bound_still_ends_at_the_rooms_lifetime() -> None:
    """Statuses well inside the per-index bound (a few hundred bytes each, one just inside each
    transfer deadline) keep restarting the transfer deadline; the room still fails once its
    lifetime is up, with that reason, and is released with the canary intact."""
    cluster = Cluster(transfer_timeout_s=5.0, room_timeout_s=30.0)
    t = Transfer(cluster, 1, 1, pages=6)
    try:
        t.recv()
        await cluster.settle()
        rr = next(iter(t.decode.receivers.rooms.values()))
        born = rr.machine.created_at
        for n in range(1, len(rr.dst_indices) + STATUS_SLACK):  # never past the status bound
            if rr.machine.state.final:
                break
            cluster.clock.advance(cluster.config.transfer_timeout_s * 0.9)
            cluster.expire()
            t.decode.route(wp.TransferStatus(src=t.prefill.address, token="", room=rr.room,
                                             transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=0,
                                             ok=True, bytes_written=n, final=False))
        assert rr.machine.state.final, "the room outlived its lifetime"
        ended = rr.machine.history[-1][0]
        assert ended - born <= cluster.config.room_timeout_s + cluster.config.transfer_timeout_s * 0.9
        assert "lifetime of 30 s" in (rr.machine.reason or "")
        assert t.decode.errors["status_flood"] == 0 and t.decode.errors["timeout"] >= 1
        await cluster.settle()
        for _, arrays in t.dst:
            assert (arrays.array == CANARY).all()
    finally:
        await cluster.close()


async def test_an_honest_room_of_one_page_per_chunk_is_within_the_bound() -> None:
    """The bound never fails a real sender: one chunk per page, a status per chunk."""
    cluster = Cluster()
    t = Transfer(cluster, 2, 1, pages=8)
    try:
        t.recv()
        await cluster.settle()
        for i in range(8):  # each chunk written before the next arrives: one status each
            for pool, _ in t.src:
                t.prefill.senders.on_chunk(pool, we.SendChunk(
                    req_id=1, pool_id=pool.pool_id, room=1, pages=t.src_pages[i:i + 1], is_last=i == 7,
                    aux=b"first-token" if i == 7 else b"", page_offset=i))
            await cluster.settle()
        assert t.decode_events()[0].state == "success"
        assert t.verify() == []
        assert t.decode.errors["status_flood"] == 0
    finally:
        await cluster.close()
