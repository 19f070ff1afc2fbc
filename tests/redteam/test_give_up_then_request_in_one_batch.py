"""Red team: a decode room given up before its request went out and reissued at once (the
engine's abort and its new recv of the id back to back, the prefill topology known and the
decode pool accepted, so the give-up and the new TransferRequest leave one after the other).

The prefill daemon reads them in one batch (PeerHub drains up to RECEIVE_BATCH queued messages
without yielding; the pair harness delivers them in two consecutive callbacks). The sender
side handled an AbortTransfer in a task of its own, so the request (handled at once) opened the
reissued room first, and the give-up, run a loop turn later, found a room every request of which
came from the giving daemon and failed it: the reissue failed, though the give-up was sent
first and that daemon's messages arrive in order.

Invariant: a room id given up and reissued is served byte-exact (a give-up takes effect in the
order its daemon sent it). Uses the in-memory transport and peers of tests/sides/pair.py."""

from __future__ import annotations

import pytest

from kvd.wire import peer as wp
from tests.sides.test_pair import Transfer


def decode_tp_requests(t: Transfer) -> int:
    return sum(1 for d in t.cluster.log if isinstance(d.msg, wp.TransferRequest))


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"), [(1, 1, 4), (2, 1, 4), (1, 2, 4), (4, 2, 2)])
@pytest.mark.parametrize("staged", [False, True])
async def test_a_give_up_and_the_reissues_request_back_to_back_serve_the_reissue(
        cluster, prefill_tp, decode_tp, kv_heads, staged):
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads, staged=staged)
    t.recv()  # its pool is not announced yet: it would ask a loop turn later
    for pool, _ in t.dst:
        t.decode.receivers.abort_from_engine(pool, 1)  # given up before asking
    t.decode.events.clear()
    for pool, _ in t.dst:  # (no loop turn: the harness's announce does not wait)
        await t.decode.announce_pool(t.prefill.address, pool, "prefill-0", None)
    t.recv()  # the reissue: accepted pools, its requests go out at once, right behind the give-ups
    order = [type(d.msg).__name__ for d in cluster.log if d.dst == t.prefill.address]
    assert order == ["AbortTransfer"] * len(order[:-decode_tp_requests(t)]) + ["TransferRequest"] * \
        decode_tp_requests(t), order
    await cluster.settle()
    t.send(chunks=2)
    await cluster.settle()
    finals = [ev.state for _, ev in t.decode.events if ev.released and ev.room == 1]
    assert finals == ["success"] * decode_tp, (finals, t.prefill.events[-1:])
    assert t.verify() == []
