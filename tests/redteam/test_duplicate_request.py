"""Red team (duplicate messages): a decode daemon's TransferRequest reaches the prefill daemon
twice, the same transfer id and sender rank both times.

The sender side takes the second copy for a second receiver asking for the room ("receiver
... asked twice") and answers it with a *failed final status for that transfer id*: the same
transfer the first copy started. The receiver fails a room that nothing was wrong with, and
its prefill engine hears failure for it.

Invariant: a duplicated message changes nothing (it is counted and dropped); the room is
byte-exact and succeeds. Mallory plays the decode daemon (inline writes, so no Mooncake
session of its own is needed)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory

pytestmark = pytest.mark.e2e


def test_a_duplicated_transfer_request_does_not_fail_its_transfer(daemons, tmp_path: Path) -> None:
    pre = daemons("prefill", *FLAGS)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    ph.fill(0x33)
    m = Mallory(tmp_path, pre)
    try:
        with pre.client() as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            key = f"{m.address}#dec#1"
            m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout=dl.to_dict(),
                                  buffers=[(1 << 40) + i * dl.buffer_bytes for i in range(dl.num_buffers)],
                                  session_id="127.0.0.1:1", prefill_engine_id="P"))
            assert m.expect(p.PoolAck).ok
            req = p.TransferRequest(src=m.address, token="", room=8, transfer_id=4242, pool_key=key,
                                    prefill_engine_id="P", sender_rank=0, dst_indices=np.array([5, 6]),
                                    dummy=False, deadline_s=6.0, inline_max_bytes=64 << 10)
            m.send(req)
            m.send(req)  # the same message again
            time.sleep(0.5)
            pc.send(pid, 8, [1, 2], True, aux=b"tok")
            st = m.expect(p.TransferStatus)
            assert st.ok, f"the duplicate failed the transfer: {st.reason}"
            assert st.final and st.bytes_written == 2 * dl.page_bytes * dl.num_buffers
            assert st.inline_data == b"\x33" * len(st.inline_data)
    finally:
        m.close()
        ph.close()
