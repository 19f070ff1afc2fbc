"""Red team round 14: a bootstrap room id reused by a second request while the first one's
object on the same engine rank is still live, SGLang's real classes over two real kvd daemons.

Attack: a client passes the same ``bootstrap_room`` to two requests (a retry of a request still
in flight); SGLang builds a second receiver (or sender) for the id on the same rank before the
first one polled its outcome. Every object of a rank reads the room's state from one shared view
keyed by the id, and a new object dropped what that view held (round 9's fix for a reuse *after*
a failed use): the first request's success event was thrown away and it polled Transferring for
good (no more events come for a room that ended: SGLang's decode queue has no deadline of its
own), or it polled the second request's failure; the second one's ``clear()`` dropped the first
one's state again.

Invariant: a request that is not the reuse is unaffected: it polls Success with byte-exact pages
and aux rows, or a clean Failed with its own reason, within its deadline; the reuse fails at once
with a reason (its pages never handed to the daemon), on both sides.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from tests.sglang.harness import Rank, check_room, fill_room, free_port, kv_classes, server_args

pytestmark = pytest.mark.e2e
GEO = dict(layers=2, total_heads=4, head_dim=16, page_size=4, num_pages=32)
SENTINEL = 0x5A5A


def _setup(pd: Any, dd: Any) -> tuple[Any, ...]:
    from sglang.srt.disaggregation.utils import DisaggregationMode

    C = kv_classes()
    bport = free_port()
    server = C["bootstrap_server"]("127.0.0.1", bport)
    p = Rank("prefill", 1, 0, **GEO)  # type: ignore[arg-type]
    d = Rank("decode", 1, 0, **GEO)  # type: ignore[arg-type]
    p.allocate()
    d.allocate()
    p.mgr = C["manager"](p.kv_args(), DisaggregationMode.PREFILL, server_args(1, bport, pd.socket_path), False)
    d.mgr = C["manager"](d.kv_args(), DisaggregationMode.DECODE, server_args(1, bport, dd.socket_path), False)
    return C, server, f"127.0.0.1:{bport}", p, d


def _end(obj: Any, timeout: float = 20.0) -> int:
    from sglang.srt.disaggregation.base.conn import KVPoll

    deadline = time.monotonic() + timeout
    while (st := obj.poll()) not in (KVPoll.Success, KVPoll.Failed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return st


def _pushed_final(mgr: Any, room: int, timeout: float = 10.0) -> None:
    """Wait until the daemon pushed the room's outcome, without polling the room's object."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = mgr.client.pushed(room)
        if st is not None and st.state in ("success", "failed"):
            return
        time.sleep(0.01)
    raise AssertionError("no outcome pushed")


def _reason(obj: Any) -> str:
    from sglang.srt.disaggregation.common.conn import KVTransferError

    with pytest.raises(KVTransferError) as ei:
        obj.failure_exception()
    return str(ei.value)


@pytest.mark.parametrize("reuse_clears", [False, True])
def test_a_live_room_id_reused_leaves_the_first_request_alone(pair, reuse_clears: bool) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, server, addr, p, d = _setup(*pair)
    try:
        room = 0x7E57_1401
        for b in d.bufs:
            b.view(torch.int16).fill_(SENTINEL)
        rv = C["receiver"](d.mgr, addr, room)
        rv.init(0)
        rv.send_metadata([1, 2, 3], 0)
        s = C["sender"](p.mgr, addr, room)
        s.init(3, 0)
        g = fill_room([p], [5, 6, 7], seed=5)
        p.meta.output_ids[0][0] = 4242
        s.send([5, 6, 7])
        _pushed_final(d.mgr, room)
        _pushed_final(p.mgr, room)
        # the reuse arrives on both engines before the first request polled its outcome
        s2 = C["sender"](p.mgr, addr, room)
        rv2 = C["receiver"](d.mgr, addr, room)
        rv2.init(0)
        rv2.send_metadata([10, 11, 12], 1)
        s2.init(3, 1)
        s2.send([8, 9, 10])
        if reuse_clears:  # the reuse fails and SGLang drops it, before the first request polls
            for x in (rv2, s2):
                if _end(x, 5.0) == KVPoll.Failed:
                    _reason(x)
                x.clear()
        assert (_end(rv), _end(s)) == (KVPoll.Success, KVPoll.Success)
        assert check_room(d, [1, 2, 3], g) > 0
        assert int(d.meta.output_ids[0][0]) == 4242
        for x in (rv2, s2):
            assert _end(x) == KVPoll.Failed
            assert "in use" in _reason(x)
        for i in (10, 11, 12):  # the reuse's pages were never written
            assert all(bool((b[i * 4:(i + 1) * 4].view(torch.int16) == SENTINEL).all()) for b in d.bufs)
        rv.clear()
        s.clear()
        # the id is free again once the first request is done with it
        rv3 = C["receiver"](d.mgr, addr, room)
        rv3.init(0)
        rv3.send_metadata([20, 21], 2)
        s3 = C["sender"](p.mgr, addr, room)
        s3.init(2, 2)
        g = fill_room([p], [22, 23], seed=6)
        s3.send([22, 23])
        assert (_end(rv3), _end(s3)) == (KVPoll.Success, KVPoll.Success)
        assert check_room(d, [20, 21], g) > 0
    finally:
        p.close()
        d.close()
        server.close()
