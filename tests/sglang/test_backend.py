"""The plug-in, refusals, abort and failures of the kvd SGLang backend."""

from __future__ import annotations

import time

import pytest
import torch

from tests.sglang.harness import Rank, free_port, kv_classes, server_args
from tests.sglang.test_transfer import gloo  # noqa: F401 (fixture)


def test_plugin_resolves_kvd_in_unpatched_sglang():
    from importlib.metadata import entry_points

    assert any(e.value == "kvd.sglang.plugin:register" for e in entry_points(group="sglang.srt.plugins"))
    C = kv_classes()
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
    from sglang.srt.disaggregation import decode, prefill
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    from kvd.sglang.conn import KvdKVManager, KvdKVReceiver, KvdKVSender

    assert "kvd" in DISAGG_TRANSFER_BACKEND_CHOICES
    assert TransferBackend("kvd").value == "kvd"
    assert C["manager"] is KvdKVManager and C["sender"] is KvdKVSender and C["receiver"] is KvdKVReceiver
    # prefill.py / decode.py hold their own binding of get_kv_class: it must be the wrapped one
    for mod in (prefill, decode):
        assert mod.get_kv_class(TransferBackend("kvd"), KVClassType.RECEIVER) is KvdKVReceiver
        assert mod.get_kv_class(TransferBackend.MOONCAKE, KVClassType.KVARGS) is not None


def test_version_range_refused():
    from kvd.sglang import UnsupportedSGLang, check_sglang_version

    assert check_sglang_version("0.5.23")
    with pytest.raises(UnsupportedSGLang, match="0.5.24"):
        check_sglang_version("0.5.24")


@pytest.mark.parametrize("change,needle", [
    (lambda a, s: setattr(a, "state_types", ["mamba"]), "state buffers"),
    (lambda a, s: setattr(a, "num_draft_entries", 2), "draft-model"),
    (lambda a, s: setattr(s, "pp_size", 2), "pipeline parallelism"),
    (lambda a, s: setattr(s, "disaggregation_decode_allocation_policy", "prefill_complete"), "prefill_complete"),
    (lambda a, s: setattr(s, "disaggregation_decode_enable_radix_cache", True), "radix cache"),
    (lambda a, s: setattr(a, "kv_item_lens", [64, 128, 64, 128]), "different item sizes"),
])
def test_unsupported_refused_at_init(change, needle):
    from kvd.sglang import UnsupportedSGLang

    C = kv_classes()
    rk = Rank("decode", 1, 0, 2, 4, 16, 4, 8)
    rk.allocate()
    try:
        args, sa = rk.kv_args(), server_args(1, 1, "/nonexistent.sock")
        change(args, sa)
        from sglang.srt.disaggregation.utils import DisaggregationMode

        with pytest.raises(UnsupportedSGLang, match=needle):
            C["manager"](args, DisaggregationMode.DECODE, sa, False)
    finally:
        rk.close()


def test_anonymous_memory_refused_with_the_fix():
    from kvd.engineclient.rawmem import RawMemoryError, shm_memory_for_pointers

    t = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(RawMemoryError, match="POSIX shared memory"):
        shm_memory_for_pointers([t.data_ptr()], [t.nbytes])


def _pair_managers(pair, ptp=1, dtp=1):
    from sglang.srt.disaggregation.utils import DisaggregationMode

    C = kv_classes()
    bport = free_port()
    server = C["bootstrap_server"]("127.0.0.1", bport)
    ranks = []
    for role, tp, d in (("prefill", ptp, pair[0]), ("decode", dtp, pair[1])):
        for r in range(tp):
            rk = Rank(role, tp, r, 2, 4, 16, 4, 16)
            rk.allocate()
            mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
            rk.mgr = C["manager"](rk.kv_args(), mode, server_args(tp, bport, d.socket_path), False)
            ranks.append(rk)
    return C, server, f"127.0.0.1:{bport}", ranks


def _wait(obj, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (p := obj.poll()) not in states and time.monotonic() < deadline:
        time.sleep(0.02)
    return p


@pytest.mark.e2e
def test_abort_mid_transfer_and_prefill_failure_seen_by_decode(pair):
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.common.conn import KVTransferError

    C, server, addr, (p, d) = _pair_managers(pair)
    try:
        # abort on decode after metadata: failed, reason kept, release fence reached
        room = 77
        rv = C["receiver"](d.mgr, addr, room)
        rv.init(0)
        rv.send_metadata([1, 2, 3], 0)
        s = C["sender"](p.mgr, addr, room)
        s.init(3, 0)
        s.send([4])  # first chunk only: the room is mid-transfer
        rv.abort()
        assert rv.poll() == KVPoll.Failed
        with pytest.raises(KVTransferError, match="Aborted"):
            rv.failure_exception()
        deadline = time.monotonic() + 10
        while not rv.is_abort_release_safe() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rv.is_abort_release_safe()
        # the prefill side learns the room failed, with kvd's reason, at once: not at its waiting
        # deadline (8 s here) when the decode gave the room up while still bootstrapping
        t0 = time.monotonic()
        assert _wait(s, (KVPoll.Failed, KVPoll.Success)) == KVPoll.Failed
        assert time.monotonic() - t0 < 5.0, "the prefill room waited out its deadline"
        with pytest.raises(KVTransferError) as ei:
            s.failure_exception()
        assert "kvd" in str(ei.value)
        rv.clear()
        s.clear()
        # a prefill that aborts: decode sees Failed with kvd's reason
        room = 78
        rv = C["receiver"](d.mgr, addr, room)
        rv.init(0)
        rv.send_metadata([5, 6], 1)
        s = C["sender"](p.mgr, addr, room)
        s.init(2, 1)
        s.send([7])
        s.abort()
        t0 = time.monotonic()
        assert _wait(rv, (KVPoll.Failed, KVPoll.Success)) == KVPoll.Failed
        assert time.monotonic() - t0 < 5.0, "the decode room waited out its deadline"
        with pytest.raises(KVTransferError) as ei:
            rv.failure_exception()
        assert "kvd" in str(ei.value)
    finally:
        for rk in (p, d):
            rk.close()
        server.close()


@pytest.mark.e2e
def test_dp_rank_resolves_through_bootstrap_server(pair):
    from sglang.srt.disaggregation.common.conn import CommonKVReceiver

    C, server, addr, (p, d) = _pair_managers(pair)
    try:
        p.mgr.dp_size = 2  # the sender registers its DP rank for rooms not routed by bootstrap_room
        C["sender"](p.mgr, addr, 4242)
        assert CommonKVReceiver.query_prefill_dp_ranks(addr, [4242]) == {"4242": 0}
        assert d.mgr.directory_for(addr, 0) == p.mgr.directory
    finally:
        for rk in (p, d):
            rk.close()
        server.close()


@pytest.mark.e2e
def test_a_daemon_that_goes_away_fails_every_room_in_flight(pair):
    """The decode daemon dies mid-room: the backend's polls answer from the pushed-event view, and
    a dead connection pushes nothing more, so every room in flight stayed Transferring/
    WaitingForInput forever (SGLang's scheduler has no deadline of its own once kvd rules the
    room). Each must reach Failed with a reason; with no daemon left, no write of it can land."""
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.common.conn import KVTransferError

    C, server, addr, (p, d) = _pair_managers(pair)
    try:
        rv = C["receiver"](d.mgr, addr, 91)
        rv.init(0)
        rv.send_metadata([1, 2, 3], 0)
        s = C["sender"](p.mgr, addr, 91)
        s.init(3, 0)
        s.send([4])  # first chunk only: the room is mid-transfer
        time.sleep(0.5)
        assert rv.poll() in (KVPoll.WaitingForInput, KVPoll.Transferring)
        queued = C["receiver"](d.mgr, addr, 92)  # one more, metadata only
        queued.init(0)
        queued.send_metadata([5], 0)
        pair[1].kill()  # the decode daemon goes away
        for room in (rv, queued):
            assert _wait(room, (KVPoll.Failed, KVPoll.Success), timeout=5) == KVPoll.Failed
            with pytest.raises(KVTransferError, match="kvd"):
                room.failure_exception()  # no hang in the release fence either: the daemon is gone
        late = C["receiver"](d.mgr, addr, 93)  # a room begun after: refused at once, not hung
        late.init(0)
        late.send_metadata([6], 0)
        assert _wait(late, (KVPoll.Failed, KVPoll.Success), timeout=5) == KVPoll.Failed
        # and the prefill side ends by kvd's own deadlines (the decode peer is dead)
        assert _wait(s, (KVPoll.Failed, KVPoll.Success), timeout=20) == KVPoll.Failed
    finally:
        for rk in (p, d):
            rk.close()
        server.close()
