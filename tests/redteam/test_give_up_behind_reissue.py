"""Red team: a decode room given up while the prefill engine's topology is unknown here (the
give-up waits for the directory's answer, up to the bootstrap timeout), then reissued (a recv of
the same id) the moment that answer comes, with the decode pool already announced to the prefill
daemon (the topology had gone stale: idle past the heartbeat timeout).

The reissue bootstraps at once from what the directory now knows and its TransferRequest goes
out first; the give-up, sent by its waiting task a loop turn later, arrives after it. The
prefill side takes a give-up from the daemon that asked for every request of a room as the end of
that room, so it failed the reissue. The prefill side reads "the give-up, then the new request"
(that daemon's messages come in order); the decode side sent them the other way round.

Invariant: a room id given up before its request went out and then reissued is served
byte-exact (the give-up of the old room reaches each prefill rank before the new room's
request). Uses the in-memory transport and peers of tests/sides/pair.py (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.wire import engine as we
from kvd.wire import peer as wp
from tests.sides.pair import layout
from tools.kvpattern import fill_prefill, pages_to_tokens, verify_decode

CANARY, SEED = 0xA5, 7


@pytest.mark.parametrize(("ptp", "dtp", "kv_heads"), [(1, 1, 4), (2, 1, 4), (1, 2, 4)])
async def test_a_give_up_sent_when_the_topology_comes_is_not_overtaken_by_the_reissue(cluster, ptp, dtp, kv_heads):
    prefill, decode = cluster.daemon("prefill"), cluster.daemon("decode")
    dst = [decode.add_pool(layout("decode", dtp, r, kv_heads=kv_heads), fill=CANARY) for r in range(dtp)]
    for pool, _ in dst:  # announced before (the topology then went stale): accepted at once
        await decode.announce_pool(prefill.address, pool, "prefill-0", None)
    rng = np.random.default_rng(1)
    src_pages = rng.choice(32, 6, replace=False).astype(np.int64)
    dst_index = rng.choice(32, 6, replace=False).astype(np.int64)

    def recv() -> None:
        for pool, _ in dst:
            decode.receivers.start(pool, we.RecvRoom(
                req_id=1, pool_id=pool.pool_id, room=1, bootstrap_addr=prefill.address,
                prefill_engine_id="prefill-0", pages=dst_index))

    recv()  # the prefill engine is not known here (yet): the rooms wait for its topology
    for pool, _ in dst:
        decode.receivers.abort_from_engine(pool, 1)  # given up: the give-up waits for the topology too
    await cluster.settle()
    assert decode.receivers.give_ups.waiting, "the give-up did not wait for the topology"
    decode.events.clear()
    # The prefill engine registers; the directory's answer and the reissued recv come together.
    src = [prefill.add_pool(layout("prefill", ptp, r, kv_heads=kv_heads)) for r in range(ptp)]
    for pool, arrays in src:
        fill_prefill(arrays, pool.layout, SEED)
    recv()
    await cluster.settle()
    kinds = [type(d.msg).__name__ for d in cluster.log if d.dst == prefill.address
             and isinstance(d.msg, wp.AbortTransfer | wp.TransferRequest)]
    assert kinds.index("AbortTransfer") < kinds.index("TransferRequest"), kinds
    for pool, _ in src:
        prefill.senders.on_chunk(pool, we.SendChunk(req_id=1, pool_id=pool.pool_id, room=1, pages=src_pages,
                                                    is_last=True, aux=b"aux", page_offset=0))
    await cluster.settle()
    finals = [ev.state for _, ev in decode.events if ev.released and ev.room == 1]
    assert finals == ["success"] * dtp, (finals, prefill.events)
    problems: list[str] = []
    for pool, arrays in dst:
        problems += verify_decode(arrays, pool.layout, pages_to_tokens(src_pages, 4),
                                  pages_to_tokens(dst_index, 4), SEED, CANARY)
    assert problems == []
