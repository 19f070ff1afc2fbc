"""Inline writes (kvd.core.inline) between the room sides: a tiny room's bytes ride in the
sender's status and the receiving daemon copies them into the room's own pages.

In-process: two fake daemons over an in-memory peer queue and a memcpy transport
(tests/sides/pair.py); the real-daemon figures are tools/bench_control.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvd.core.inline import pack_ops
from kvd.core.planner import WriteOps
from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import CANARY, Transfer


@pytest.fixture
async def cluster():
    c = Cluster(inline_max_bytes=64 << 10)
    yield c
    await c.close()


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads", "hisparse"),
                         [(1, 1, 4, False), (2, 1, 4, False), (1, 2, 4, False), (4, 1, 2, False),
                          (1, 4, 2, False), (3, 1, 3, False), (2, 4, 8, False), (1, 1, 4, True),
                          (2, 1, 4, True)])
async def test_inline_rooms_are_exact_with_no_transport_write(cluster, prefill_tp, decode_tp, kv_heads, hisparse):
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads, hisparse=hisparse)
    t.recv()
    await cluster.settle()
    t.send(chunks=2)
    await cluster.settle()
    assert t.verify() == []
    events = t.decode_events()
    assert all(ev is not None and ev.state == "success" and ev.released and ev.bytes_done == ev.bytes_total
               for ev in events), events
    assert t.prefill.transport.batches == 0, "a tiny room went through the transport"
    assert t.prefill.inline_bytes == sum(ev.bytes_total for ev in events if ev is not None)
    assert not t.decode.errors and not t.prefill.errors


async def test_a_room_over_the_limit_goes_through_the_transport():
    c = Cluster(inline_max_bytes=64)
    try:
        t = Transfer(c, 1, 1)
        t.recv()
        await c.settle()
        t.send(chunks=2)
        await c.settle()
        assert t.verify() == []
        assert t.prefill.transport.batches > 0 and t.prefill.inline_bytes == 0
    finally:
        await c.close()


async def test_the_receiver_limit_wins_over_the_senders():
    """A receiver that asks for nothing inline (0: an older one, or a GPU pool) gets transport writes."""
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 1, 1)
        t.decode.config = dataclasses.replace(c.config, inline_max_bytes=0)
        t.recv()
        await c.settle()
        assert all(m.inline_max_bytes == 0 for m in c.sent(wp.TransferRequest))
        t.send(chunks=1)
        await c.settle()
        assert t.verify() == [] and t.prefill.inline_bytes == 0 and t.prefill.transport.batches > 0
    finally:
        await c.close()


# --- a hostile or buggy sender -----------------------------------------------------------------

def _hostile_status(t: Transfer, ops: bytes, data: bytes, **fields: object) -> wp.TransferStatus:
    rr = next(iter(t.decode.receivers.rooms.values()))
    base = dict(room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=0, ok=True,
                bytes_written=len(data), final=False, inline_ops=ops, inline_data=data)
    return wp.TransferStatus(**(base | fields))  # type: ignore[arg-type]


def _other_page_op(t: Transfer, n: int = 16) -> tuple[WriteOps, int]:
    """An op into a page of the decode pool that is not one of the room's."""
    pool, _ = t.dst[0]
    outside = next(p for p in range(pool.layout.num_pages) if p not in set(t.dst_index.tolist()))
    addr = pool.buffers[0] + outside * pool.layout.page_bytes
    return WriteOps(np.array([0]), np.array([addr]), np.array([n])), outside


def _hostile_cases(t: Transfer) -> dict[str, tuple[bytes, bytes]]:
    pool, _ = t.dst[0]
    inside = pool.buffers[0] + int(t.dst_index[0]) * pool.layout.page_bytes
    outside, _ = _other_page_op(t)
    straddle = inside + pool.layout.page_bytes - 8  # runs off the room's page into the next one
    return {
        "outside the room's pages": (pack_ops(outside), b"\xee" * 16),
        "straddling into a page not the room's": (
            pack_ops(WriteOps(np.array([0]), np.array([straddle]), np.array([16]))), b"\xee" * 16),
        "below every buffer": (pack_ops(WriteOps(np.array([0]), np.array([64]), np.array([16]))), b"\xee" * 16),
        "past the end of the last buffer": (
            pack_ops(WriteOps(np.array([0]), np.array([pool.buffers[-1] + pool.layout.buffer_bytes - 8]),
                              np.array([16]))), b"\xee" * 16),
        "lengths that do not add up": (pack_ops(WriteOps(np.array([0]), np.array([inside]), np.array([8]))),
                                       b"\xee" * 16),
        "a zero length": (pack_ops(WriteOps(np.array([0, 0]), np.array([inside, inside]), np.array([0, 16]))),
                          b"\xee" * 16),
        "ops not in pairs": (b"\x00" * 24, b""),
        "over the receiver's limit": (pack_ops(WriteOps(np.array([0]), np.array([inside]), np.array([65 << 10]))),
                                      b"\xee" * (65 << 10)),
    }


async def _next_room_is_exact(t: Transfer, cluster: Cluster) -> None:
    """The daemons keep serving: a fresh room on the same pools is byte-exact."""
    t.decode.events.clear()
    t.recv(room=2)
    await cluster.settle()
    t.send(room=2, chunks=1)
    await cluster.settle()
    ev = t.decode_events(room=2)[0]
    assert ev is not None and ev.state == "success", ev
    assert t.verify() == []


@pytest.mark.parametrize("case", ["outside the room's pages", "straddling into a page not the room's",
                                  "below every buffer", "past the end of the last buffer",
                                  "lengths that do not add up", "a zero length", "ops not in pairs",
                                  "over the receiver's limit"])
async def test_hostile_inline_bytes_fail_the_room_and_touch_nothing(cluster, case):
    """Invariants: the room fails with a reason and a counter; no byte outside the room's pages
    changes (the canary everywhere else survives); the next room on the same pools is exact."""
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    pool, arrays = t.dst[0]
    before = arrays.array.copy()
    ops, data = _hostile_cases(t)[case]
    cluster.send(t.prefill.address, t.decode.address, _hostile_status(t, ops, data))
    await cluster.settle()
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and ev.reason, ev
    assert t.decode.errors["bad_peer_message"] == 1
    assert np.array_equal(before, arrays.array), "a hostile inline write changed the pool"
    assert (arrays.array == CANARY).all()
    t.send(room=1, chunks=1)  # the failed room's sender side ends too
    await cluster.settle()
    await _next_room_is_exact(t, cluster)


async def test_inline_bytes_after_the_room_failed_never_land(cluster):
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    pool, arrays = t.dst[0]
    rr = next(iter(t.decode.receivers.rooms.values()))
    t.decode.receivers.abort_from_engine(pool, 1)
    inside = pool.buffers[0] + int(t.dst_index[0]) * pool.layout.page_bytes
    status = wp.TransferStatus(room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=0,
                               ok=True, bytes_written=16, final=True,
                               inline_ops=pack_ops(WriteOps(np.array([0]), np.array([inside]), np.array([16]))),
                               inline_data=b"\xee" * 16)
    cluster.send(t.prefill.address, t.decode.address, status)
    await cluster.settle()
    assert (arrays.array == CANARY).all(), "inline bytes landed in a failed room"


async def test_a_room_mixing_transport_and_inline_chunks_is_exact_and_in_order():
    """A big chunk first (a transport write, handed to the drain task), then small ones: the
    final status must not overtake the transport writes still in flight."""
    probe = Cluster()
    t0 = Transfer(probe, 1, 1)
    one_page = t0.dst[0][0].layout.page_bytes
    await probe.close()
    c = Cluster(inline_max_bytes=one_page)
    try:
        t = Transfer(c, 1, 1)
        t.recv()
        await c.settle()
        t.prefill.transport.hold()  # the transport writes stay in flight until released
        t.send(chunks=4)  # 6 pages: 2, 2, 1, 1
        await c.settle(50)
        assert not [m for m in c.sent(wp.TransferStatus) if m.final], "final status before the writes landed"
        t.prefill.transport.release()
        await c.settle()
        assert t.verify() == []
        ev = t.decode_events()[0]
        assert ev is not None and ev.state == "success", ev
        assert t.prefill.transport.batches > 0
    finally:
        await c.close()


async def test_a_sender_cannot_write_the_heads_another_sender_owes(cluster):
    """Heterogeneous TP (2 -> 1): sender rank 0 owes heads 0-1 of each token row, rank 1 heads
    2-3. An inline write of rank 0 into rank 1's heads of the room's own pages is refused."""
    t = Transfer(cluster, 2, 1, kv_heads=4)
    t.recv()
    await cluster.settle()
    pool, arrays = t.dst[0]
    lay = pool.layout
    row = pool.buffers[0] + int(t.dst_index[0]) * lay.page_bytes  # first token row of a room page
    theirs = pack_ops(WriteOps(np.array([0]), np.array([row + 2 * lay.head_bytes]), np.array([lay.head_bytes])))
    cluster.send(t.prefill.address, t.decode.address, _hostile_status(t, theirs, b"\xee" * lay.head_bytes))
    await cluster.settle()
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and "heads" in ev.reason, ev
    assert (arrays.array == CANARY).all()
    await _next_room_is_exact(t, cluster)  # its own heads of the same rows are fine


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "hisparse"), [(1, 1, False), (2, 2, False), (1, 1, True)])
async def test_a_lost_status_with_inline_bytes_fails_the_room(cluster, prefill_tp, decode_tp, hisparse):
    """A progress status carrying inline bytes is lost (a full peer queue or a reconnect drops
    it): the final status still counts those bytes in ``bytes_written``, so without the sender's
    running total of inline bytes the room succeeded with its rows unwritten (found by the red
    team's random orderings, TP 2->2). It must fail with the reason, and the engine's sentinel
    rows stay as they were."""
    t = Transfer(cluster, prefill_tp, decode_tp, hisparse=hisparse)
    t.recv()
    await cluster.settle()
    dropped: list[wp.TransferStatus] = []

    def drop_first_inline(d) -> bool:  # type: ignore[no-untyped-def]
        msg = d.msg
        if isinstance(msg, wp.TransferStatus) and msg.inline_data and not msg.final and not dropped:
            dropped.append(msg)
            return True
        return False

    cluster.hold = drop_first_inline
    t.send(chunks=2)
    await cluster.settle()
    cluster.held.clear()  # lost
    cluster.hold = lambda d: False
    await cluster.settle()
    assert dropped, "no progress status carried inline bytes"
    events = t.decode_events()
    assert any(ev is not None and ev.state == "failed" and "a status was lost" in ev.reason for ev in events), events
    assert all(ev is None or ev.state != "success" or ev.bytes_done == ev.bytes_total for ev in events)
    assert t.decode.errors["lost_status"] >= 1
    # (Per rank: the other prefill ranks' receivers got all of theirs; SGLang reduces over ranks.)
    lost_pool = t.src[dropped[0].sender_rank][0].pool_id
    assert not any(ev.state == "success" for pid, ev in t.prefill.events if ev.released and pid == lost_pool), \
        "the prefill rank whose status was lost heard success"
