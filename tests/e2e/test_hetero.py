"""End to end, byte for byte: real daemons, real Mooncake TCP, fake engine rank processes,
every kind of prefill/decode TP combination on the direct (per-slice) path."""

from __future__ import annotations

import pytest

from tests.support import WRITES, check_reports, run_cluster, writes_checked, writes_pair

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("writes", list(WRITES))
@pytest.mark.parametrize("prefill_tp, decode_tp, kv_heads", [
    (1, 1, 4),   # same TP
    (1, 2, 4), (2, 1, 4), (4, 1, 8), (1, 4, 8), (2, 4, 8), (4, 2, 8), (8, 2, 8),
    (4, 2, 2), (2, 4, 2),  # GQA: 2 kv heads replicated on TP 4 (both directions)
    (4, 4, 2), (2, 8, 2),
    (3, 2, 6), (2, 3, 6),  # TP sizes that do not divide each other: mapped head by head
])
def test_hetero_tp_byte_exact(daemons, writes, prefill_tp, decode_tp, kv_heads):
    prefill, decode = writes_pair(daemons, writes)
    check_reports(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, kv_heads=kv_heads))
    writes_checked(prefill, writes)


@pytest.mark.parametrize("writes", list(WRITES))
@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 4), (4, 1), (1, 1)])
def test_mla_byte_exact(daemons, writes, prefill_tp, decode_tp):
    prefill, decode = writes_pair(daemons, writes)
    check_reports(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, mla=True,
                       head_dim=24))
    writes_checked(prefill, writes)


def test_prefill_ranks_served_by_several_daemons(daemons):
    """A prefill engine spread over two nodes: ranks 0,2 on one daemon (the directory), 1,3 on
    another; the decode daemon discovers which daemon serves each rank."""
    flags = ("--timeouts-waiting-s", "20")
    node_a, node_b, decode = daemons("pa", *flags), daemons("pb", *flags), daemons("d", *flags)
    check_reports(run_cluster([node_a, node_b], decode, prefill_tp=4, decode_tp=2, kv_heads=8))


def test_prefill_ranks_that_disagree_on_layout_are_refused(pair):
    import numpy as np

    from kvd.client import KvdLayoutError, RoomFailed
    from kvd.hostpool import HostPool
    from kvd.layout import PoolLayout

    prefill, decode = pair
    a = PoolLayout("P", "prefill", 2, 0, 2, 4, 8, "bfloat16", 4, 8)
    b = PoolLayout("P", "prefill", 2, 1, 2, 4, 16, "bfloat16", 4, 8)  # head_dim differs
    d = PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 8)
    with HostPool.create(a) as ha, HostPool.create(b) as hb, HostPool.create(d) as hd, \
            prefill.client() as pc, decode.client() as dc:
        pc.register_pool(a, ha, bootstrap=prefill.address)
        with pytest.raises(KvdLayoutError, match="disagree"):
            pc.register_pool(b, hb, bootstrap=prefill.address)
        did = dc.register_pool(d, hd)
        dc.recv(did, 1, prefill.address, "P", np.arange(2))
        with pytest.raises(RoomFailed, match="disagree"):
            dc.wait(1, timeout=20)


def test_a_second_round_on_the_same_pools_is_byte_exact(daemons):
    """The warm benchmark's shape (tools/bench_transfer.py --warm): every rank runs the rooms once,
    then the same pages again under new room ids; the second round is checked byte for byte."""
    flags = ("--transfer-inline-max-bytes", "0")
    prefill, decode = daemons("p", *flags), daemons("d", *flags)
    reports = run_cluster(prefill, decode, prefill_tp=2, decode_tp=1, kv_heads=4, warm=True)
    check_reports(reports)
    assert all(r.rooms_ok == 3 for r in reports)
