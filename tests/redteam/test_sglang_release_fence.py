"""Red team: through the SGLang backend, a decode room fails while its prefill sender (mallory,
an authorized peer playing the directory and the only sender) can still write into its pages.

kvd releases a failed room's pages only once no write can land (the sender answered the abort,
or its session was revoked after ``timeouts.abort_fence_s``), and says so with ``released`` on
the room's events. But SGLang 0.5.23 frees a failed request's KV pages as soon as the reduced
poll says ``KVPoll.Failed`` (``DecodeTransferQueue.pop_transferred``: ``failure_exception()``
then ``_release_request``): it waits for a drain only with a deferred release, which the kvd
backend does not ask for (``enable_deferred_decode_kv_release = False``). So:

- an aborted request (SGLang's ``AbortReq``: ``kv_receiver.abort()``) had its pages freed and
  handed to the next request while the daemon still held the room unreleased and mallory's
  receive session stayed open: a stalled (or hostile) sender's write landed in another
  request's KV;
- when another TP rank's room failed, the reduced poll is ``Failed`` on every rank: a rank whose
  own room was still live heard ``failure_exception()`` and SGLang freed its pages, while the
  daemon went on with the room (nothing aborted it) and its sender wrote into them.

Invariant: when ``failure_exception()`` returns to SGLang (which frees the pages next), the
daemon has released the room (no write of it can land: mallory, which never answers the
abort, is fenced off) and the reason is kept. End to end: real decode daemon, SGLang's real bootstrap server and KVArgs."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sglang"))
import torchvision_stub  # noqa: E402

torchvision_stub.install()

from tests.redteam.mallory import FLAGS, Mallory  # noqa: E402
from tests.sglang.harness import Rank, free_port, kv_classes, server_args  # noqa: E402

pytestmark = pytest.mark.e2e


def _decode_rank(daemons, tmp_path: Path):
    """A decode daemon, mallory (an authorized peer) registered as prefill DP group 0 of an SGLang
    bootstrap server, and one SGLang decode rank on the daemon."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    dec = daemons("decode", *FLAGS)
    m = Mallory(tmp_path, dec)
    C = kv_classes()
    bport = free_port()
    server = C["bootstrap_server"]("127.0.0.1", bport)
    ip, _, port = m.address.removeprefix("tcp://").rpartition(":")
    payload = {"attn_tp_size": 1, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0, "attn_dp_size": 1,
               "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0, "system_dp_size": 1, "system_dp_rank": 0,
               "rank_ip": ip, "rank_port": int(port), "page_size": 4, "kv_cache_dtype": "bfloat16",
               "load_balance_method": "follow_bootstrap_room"}
    deadline = time.monotonic() + 10
    while True:  # the server comes up in a thread of its own
        try:
            assert requests.put(f"http://127.0.0.1:{bport}/route", json=payload, timeout=5).status_code == 200
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    rk = Rank("decode", 1, 0, 2, 4, 16, 4, 16)
    rk.allocate()
    rk.mgr = C["manager"](rk.kv_args(), DisaggregationMode.DECODE, server_args(1, bport, dec.socket_path), False)
    prefill = dataclasses.replace(rk.mgr.layout, engine_id=f"sglang-p{bport}-dp0", role="prefill")
    return C, server, f"127.0.0.1:{bport}", dec, m, rk, prefill


def _room_taken_by_mallory(C, addr: str, rk: Rank, m: Mallory, prefill, room: int):
    rv = C["receiver"](rk.mgr, addr, room)
    rv.init(0)
    rv.send_metadata([3, 4, 5], 0)
    req, _ = m.take_room(prefill)  # mallory accepts the request: it may write from now on
    assert req.room == room
    return rv


def _sglang_frees_pages(rv) -> str:
    """What SGLang's pop_transferred does once the reduced poll is Failed: failure_exception(),
    then it frees the request's KV pages. Returns the failure's text."""
    from sglang.srt.disaggregation.common.conn import KVTransferError

    with pytest.raises(KVTransferError) as ei:
        rv.failure_exception()
    return str(ei.value)


def test_an_aborted_request_frees_its_pages_only_after_the_daemon_released_them(daemons, tmp_path: Path) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, server, addr, dec, m, rk, prefill = _decode_rank(daemons, tmp_path)
    try:
        rv = _room_taken_by_mallory(C, addr, rk, m, prefill, 501)
        rv.abort()  # SGLang's AbortReq on a request in the transfer queue
        assert rv.poll() == KVPoll.Failed
        reason = _sglang_frees_pages(rv)
        # The pages are SGLang's again: the daemon must have fenced the room off by now (mallory
        # never answered the abort: its session was revoked after the abort fence).
        st = rk.mgr.client.poll(501)
        assert st.released, f"SGLang freed the pages of room 501 while kvd still holds it ({st.state}, unreleased)"
        assert "Aborted" in reason and st.state == "failed"
        assert dec.status()["daemon"]["errors"].get("peer_revoked", 0) >= 1
        rv.clear()
    finally:
        m.close()
        rk.close()
        server.close()


def test_another_ranks_failure_fences_this_ranks_live_room_before_its_pages_go(daemons, tmp_path: Path) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, server, addr, dec, m, rk, prefill = _decode_rank(daemons, tmp_path)
    try:
        rv = _room_taken_by_mallory(C, addr, rk, m, prefill, 502)
        assert rv.poll() in (KVPoll.WaitingForInput, KVPoll.Transferring)  # this rank's room is fine
        # Another TP rank's room failed: the all-reduced poll is Failed here too.
        reason = _sglang_frees_pages(rv)
        st = rk.mgr.client.poll(502)
        assert st.released and st.state == "failed", \
            f"SGLang freed the pages of room 502 while kvd still runs it ({st.state}, released={st.released})"
        assert reason
        rv.clear()
    finally:
        m.close()
        rk.close()
        server.close()
