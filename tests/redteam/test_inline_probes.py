"""Red-team probes of inline writes (all held): more than 16 ops into another sender's heads,
HiSparse tokens outside the room, repeats past what a sender owes, replays into a reused room,
a receiver that asked for none.

In-process: the pair harness's in-memory peer queue and memcpy transport (tests/sides/pair.py)."""
from __future__ import annotations

import dataclasses

import numpy as np

from kvd.core.inline import pack_ops
from kvd.core.planner import WriteOps
from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import CANARY, Transfer


def _status(rr, ops: WriteOps, data: bytes, **kw) -> wp.TransferStatus:
    base = dict(room=rr.room, transfer_id=rr.transfer_id, pool_key=rr.pool.key, sender_rank=0, ok=True,
                bytes_written=len(data), final=False, inline_ops=pack_ops(ops), inline_data=data)
    return wp.TransferStatus(**(base | kw))


async def test_receiver_that_asked_for_none_refuses_inline() -> None:
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 1, 1)
        t.decode.config = dataclasses.replace(c.config, inline_max_bytes=0)
        t.recv()
        await c.settle()
        assert all(m.inline_max_bytes == 0 for m in c.sent(wp.TransferRequest))
        pool, arrays = t.dst[0]
        rr = next(iter(t.decode.receivers.rooms.values()))
        inside = pool.buffers[0] + int(t.dst_index[0]) * pool.layout.page_bytes
        c.send(t.prefill.address, t.decode.address,
               _status(rr, WriteOps(np.array([0]), np.array([inside]), np.array([16])), b"\xee" * 16))
        await c.settle()
        ev = t.decode_events()[0]
        assert ev is not None and ev.state == "failed" and "did not ask" in ev.reason
        assert (arrays.array == CANARY).all()
    finally:
        await c.close()


async def test_replayed_inline_status_of_an_old_transfer_never_lands_in_a_reused_room() -> None:
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 1, 1)
        t.recv()
        await c.settle()
        t.send(chunks=2)
        await c.settle()
        assert t.verify() == []
        old = [m for m in c.sent(wp.TransferStatus) if m.inline_data]
        assert old
        pool, arrays = t.dst[0]
        arrays.array[:] = CANARY
        t.recv()  # the same room id and pages again
        await c.settle()
        for m in old:  # replay every old inline status, final included
            c.send(t.prefill.address, t.decode.address, m)
        await c.settle()
        assert (arrays.array == CANARY).all()
        assert t.decode.receivers.rooms, "the new room was disturbed by the replay"
        t.send(chunks=1)
        await c.settle()
        assert t.verify() == []
    finally:
        await c.close()


async def test_duplicated_inline_statuses_are_capped_by_bytes_owed() -> None:
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 1, 1)
        t.recv()
        await c.settle()
        pool, arrays = t.dst[0]
        rr = next(iter(t.decode.receivers.rooms.values()))
        page = pool.buffers[0] + int(t.dst_index[0]) * pool.layout.page_bytes
        n = pool.layout.page_bytes
        for _ in range(rr.bytes_total // n + 2):
            c.send(t.prefill.address, t.decode.address,
                   _status(rr, WriteOps(np.array([0]), np.array([page]), np.array([n])), b"\xee" * n))
        await c.settle()
        ev = t.decode_events()[0]
        assert ev is not None and ev.state == "failed" and "owed" in ev.reason, ev
        lay = pool.layout
        others = np.ones(arrays.array.shape, bool)
        for b in range(lay.num_buffers):
            for p in t.dst_index.tolist():
                s = b * lay.buffer_bytes + p * lay.page_bytes
                others[s:s + lay.page_bytes] = False
        assert (arrays.array[others] == CANARY).all()
    finally:
        await c.close()


async def test_many_ops_heterogeneous_one_into_the_other_senders_heads() -> None:
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 2, 1, kv_heads=4)
        t.recv()
        await c.settle()
        pool, arrays = t.dst[0]
        lay = pool.layout
        row = pool.buffers[0] + int(t.dst_index[0]) * lay.page_bytes
        hb = lay.head_bytes
        dst = [row + k * lay.token_bytes for k in range(20)] + [row + 2 * hb]  # > SMALL ops: numpy path
        dst = [d for d in dst if (d - pool.buffers[0]) // lay.page_bytes in set(t.dst_index.tolist())]
        ops = WriteOps(np.zeros(len(dst), np.int64), np.array(dst), np.full(len(dst), hb))
        c.send(t.prefill.address, t.decode.address, _status(next(iter(t.decode.receivers.rooms.values())),
                                                           ops, b"\xee" * (hb * len(dst))))
        await c.settle()
        ev = t.decode_events()[0]
        assert ev is not None and ev.state == "failed" and "heads" in ev.reason, ev
        assert (arrays.array == CANARY).all()
    finally:
        await c.close()


async def test_hisparse_token_outside_the_room() -> None:
    c = Cluster(inline_max_bytes=64 << 10)
    try:
        t = Transfer(c, 1, 1, hisparse=True)
        t.recv()
        await c.settle()
        pool, arrays = t.dst[0]
        lay = pool.layout
        outside = next(i for i in range(lay.num_tokens) if i not in set(t.dst_index.tolist()))
        inside = int(t.dst_index[0])
        dst = [pool.buffers[0] + inside * lay.token_bytes] * 20 + [pool.buffers[0] + outside * lay.token_bytes]
        ops = WriteOps(np.zeros(len(dst), np.int64), np.array(dst), np.full(len(dst), 4))
        c.send(t.prefill.address, t.decode.address, _status(next(iter(t.decode.receivers.rooms.values())),
                                                           ops, b"\xee" * (4 * len(dst))))
        await c.settle()
        ev = t.decode_events()[0]
        assert ev is not None and ev.state == "failed", ev
        assert (arrays.array == CANARY).all()
    finally:
        await c.close()
