"""Red team: one decode engine whose ranks sit on two decode daemons (decode TP 2, rank 0 on
daemon A, rank 1 on daemon B; prefill TP 1, or 3 where prefill rank 1 serves both), a room given
up before its requests went out, then reissued (a recv of the same id on both ranks).

Both daemons give the room up to the prefill rank they share. The prefill side remembered one
giver per (pool, room): the last give-up to arrive. A request from the other daemon was then
"another daemon's request for a room that ended before it asked" and was refused at once, so
the reissue failed (the abort-storm flake the give-up memory was changed to fix, back whenever
a decode engine spans daemons); with the engine's chunk first, the room waited on the one
giver it knew of only.

Invariants: a reissued room id is served byte-exact whichever order the give-ups, the requests
and the chunk arrive in; a room given up by two daemons and reissued by only one still fails
within the bootstrap timeout (the other daemon's ranks never ask). Uses the in-memory transport
and peers of tests/sides/pair.py (no sockets, no Mooncake)."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.wire import engine as we
from kvd.wire import peer as wp
from tests.sides.pair import Cluster, layout
from tools.kvpattern import fill_prefill, pages_to_tokens, verify_decode

CANARY, SEED = 0xA5, 7


class Split:
    """Prefill TP ``ptp`` on one daemon; decode TP 2 with rank 0 on daemon A, rank 1 on B."""

    def __init__(self, cluster: Cluster, ptp: int, kv_heads: int) -> None:
        self.cluster = cluster
        self.prefill = cluster.daemon("prefill")
        self.decoders = [cluster.daemon("decode-a"), cluster.daemon("decode-b")]
        self.src = [self.prefill.add_pool(layout("prefill", ptp, r, kv_heads=kv_heads)) for r in range(ptp)]
        self.dst = [d.add_pool(layout("decode", 2, r, kv_heads=kv_heads), fill=CANARY)
                    for r, d in enumerate(self.decoders)]
        for pool, arrays in self.src:
            fill_prefill(arrays, pool.layout, SEED)
        rng = np.random.default_rng(1)
        self.src_pages = rng.choice(32, 6, replace=False).astype(np.int64)
        self.dst_index = rng.choice(32, 6, replace=False).astype(np.int64)

    def recv(self, rank: int, room: int = 1) -> None:
        pool = self.dst[rank][0]
        self.decoders[rank].receivers.start(pool, we.RecvRoom(
            req_id=1, pool_id=pool.pool_id, room=room, bootstrap_addr=self.prefill.address,
            prefill_engine_id="prefill-0", pages=self.dst_index))

    def abort(self, rank: int, room: int = 1) -> None:
        self.decoders[rank].receivers.abort_from_engine(self.dst[rank][0], room)

    def send(self, room: int = 1) -> None:
        for pool, _ in self.src:
            self.prefill.senders.on_chunk(pool, we.SendChunk(
                req_id=1, pool_id=pool.pool_id, room=room, pages=self.src_pages, is_last=True,
                aux=b"aux", page_offset=0))

    def finals(self, rank: int, room: int = 1) -> list[str]:
        pool = self.dst[rank][0]
        return [ev.state for pid, ev in self.decoders[rank].events
                if pid == pool.pool_id and ev.room == room and ev.released]

    def prefill_finals(self, room: int = 1) -> list[str]:
        return [ev.state for _, ev in self.prefill.events if ev.released and ev.room == room]

    def verify(self) -> list[str]:
        problems: list[str] = []
        for pool, arrays in self.dst:
            problems += verify_decode(arrays, pool.layout, pages_to_tokens(self.src_pages, 4),
                                      pages_to_tokens(self.dst_index, 4), SEED, CANARY)
        return problems


async def _give_up_both(s: Split, first: int) -> None:
    for rank in (first, 1 - first):
        s.recv(rank)
    for rank in (first, 1 - first):
        s.abort(rank)  # still bootstrapping (its pool announce pending): given up, in this order
    await s.cluster.settle()
    assert s.finals(0) == ["failed"] and s.finals(1) == ["failed"]
    assert not s.cluster.sent(wp.TransferRequest), "a request went out: not a give-up"
    for d in (*s.decoders, s.prefill):
        d.events.clear()


@pytest.mark.parametrize(("ptp", "kv_heads"), [(1, 4), (3, 6)])
@pytest.mark.parametrize("first_give_up", [0, 1])
@pytest.mark.parametrize("first_request", [0, 1])
@pytest.mark.parametrize("chunk_first", [True, False])
async def test_a_room_given_up_by_two_decode_daemons_and_reissued_is_served(
        cluster, ptp, kv_heads, first_give_up, first_request, chunk_first):
    s = Split(cluster, ptp, kv_heads)
    await _give_up_both(s, first_give_up)
    if chunk_first:
        s.send()
        await cluster.settle()
    s.recv(first_request)
    await cluster.settle()
    s.recv(1 - first_request)
    await cluster.settle()
    if not chunk_first:
        s.send()
        await cluster.settle()
    assert s.finals(0) == ["success"] and s.finals(1) == ["success"], (s.finals(0), s.finals(1),
                                                                         s.prefill.events[-1:])
    assert s.verify() == []
    cluster.clock.advance(cluster.config.bootstrap_timeout_s + 0.1)
    cluster.expire()
    await cluster.settle()
    assert s.prefill_finals() and all(st == "success" for st in s.prefill_finals()), s.prefill.events
    assert not s.prefill.senders.rooms and not any(d.receivers.rooms for d in s.decoders)


@pytest.mark.parametrize("reissued_by", [0, 1])
async def test_a_room_given_up_by_two_daemons_and_reissued_by_one_still_fails_in_time(reissued_by):
    """Only one daemon's rank asks again: the other's never will, so the prefill room fails
    within the bootstrap timeout (not at its waiting deadline, 30 s here)."""
    cluster = Cluster(waiting_timeout_s=30.0)
    try:
        await _reissued_by_one(cluster, reissued_by)
    finally:
        await cluster.close()


async def _reissued_by_one(cluster: Cluster, reissued_by: int) -> None:
    s = Split(cluster, 1, 4)
    await _give_up_both(s, 0)
    s.send()
    s.recv(reissued_by)
    await cluster.settle()
    assert not s.prefill_finals()
    cluster.clock.advance(cluster.config.bootstrap_timeout_s + 0.1)
    cluster.expire()
    await cluster.settle()
    assert s.prefill_finals() == ["failed"], s.prefill.events
    assert s.finals(reissued_by) == ["failed"]
    assert not s.prefill.senders.rooms


@pytest.mark.parametrize("first_request", [0, 1])
async def test_the_engines_chunk_between_the_two_give_ups_does_not_fail_the_reissue(cluster, first_request):
    """The prefill engine's first chunk of the reissue comes after daemon A's give-up and before
    daemon B's (they travel on different sockets). B's give-up found a started room with no
    request and failed it at once, as if it had been the room given up, though it had been
    told to wait for A's new recv of the id."""
    s = Split(cluster, 1, 4)
    b = s.decoders[1].address
    cluster.hold = lambda d: d.src == b and isinstance(d.msg, wp.AbortTransfer)
    s.recv(0)
    s.recv(1)
    s.abort(0)
    s.abort(1)
    await cluster.settle()
    assert not cluster.sent(wp.TransferRequest) and len(cluster.held) == 1
    s.send()  # the reissue's first chunk, between the give-ups
    await cluster.settle()
    cluster.hold = lambda d: False
    cluster.release_held()
    await cluster.settle()
    assert s.finals(0) == ["failed"] and s.finals(1) == ["failed"]
    assert not s.prefill_finals(), ("the reissued room failed at the second give-up", s.prefill.events)
    for d in s.decoders:
        d.events.clear()
    s.recv(first_request)
    await cluster.settle()
    s.recv(1 - first_request)
    await cluster.settle()
    assert s.finals(0) == ["success"] and s.finals(1) == ["success"], (s.finals(0), s.finals(1))
    assert s.verify() == []
