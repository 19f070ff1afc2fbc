"""Red team: a prefill engine's last chunk carries aux bytes too big for a peer message.

The aux rides in the sender's final TransferStatus, and nothing holds it to what a peer message
may carry (``peer.max_message_bytes``; the engine socket takes frames up to its own, larger by
default here). The decode daemon's ZMQ socket drops the oversized status unseen, so both rooms
sit until their deadline (``timeouts.waiting_s``, 300 s by default) and fail with "timed out",
naming nothing of the cause, with no counter for it.

Invariant: bad input gets a clear error and a counter (the chunk is refused at once, naming the
limit); the daemons serve on."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdError
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SENTINEL, SHAPE, _fresh_room_works

pytestmark = pytest.mark.e2e

PEER_MAX = ("--peer-max-message-bytes", "4MiB")


def test_an_aux_too_big_for_a_peer_message_is_refused_at_once(daemons) -> None:
    pre, dec = daemons("prefill", *FLAGS, *PEER_MAX), daemons("decode", *FLAGS, *PEER_MAX)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    dh.fill(SENTINEL)
    try:
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            dc.recv(did, 3, pre.address, "P", [5, 6])
            time.sleep(0.5)  # the request is at the prefill daemon
            t0 = time.monotonic()
            with pytest.raises(KvdError) as refused:
                pc.send(pid, 3, [1, 2], True, aux=b"x" * (5 << 20))
            assert "aux" in str(refused.value), refused.value
            pc.abort(pid, 3)
            with pytest.raises(KvdError):
                dc.wait(3, timeout=20)
            assert time.monotonic() - t0 < 4, "the room waited for its deadline"
        assert pre.status()["daemon"]["errors"].get("bad_request", 0) >= 1
        _fresh_room_works(pre, dec, PoolLayout("Q", "prefill", 1, 0, **SHAPE), PoolLayout("E", "decode", 1, 0, **SHAPE))
    finally:
        ph.close()
        dh.close()


def test_destination_indices_too_many_for_a_peer_message_are_refused_at_once(daemons) -> None:
    """The same for a decode room: its indices ride in the TransferRequest (8 bytes each)."""
    pre, dec = daemons("prefill", *FLAGS, *PEER_MAX), daemons("decode", *FLAGS, *PEER_MAX)
    # A pool of 600,000 tiny pages: the room's indices are all its own, just too many to send.
    big = dict(SHAPE, total_kv_heads=1, head_dim=1, dtype="uint8", page_size=1, num_pages=600_000)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **big), PoolLayout("D", "decode", 1, 0, **big)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    try:
        with pre.client() as pc, dec.client() as dc:
            pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            with pytest.raises(KvdError) as refused:  # 4.8 MB of indices (every one a valid page)
                dc.recv(did, 4, pre.address, "P", np.arange(600_000))
            assert "max_message_bytes" in str(refused.value), refused.value
        assert dec.status()["daemon"]["errors"].get("bad_request", 0) >= 1
    finally:
        ph.close()
        dh.close()
