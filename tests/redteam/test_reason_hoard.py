"""Red team: an authorized peer (mallory, posing as a decode daemon) asks a prefill daemon for 8
rooms into its own announced pool, then fails each with a RoomOutcome whose ``reason`` is 16 MiB
of text.

The sender room failed with "receiver failed the room: <reason>", whole: the text went into the
room's state, the warning logged for it, the final RoomEvent pushed to the prefill engine, and
the per-connection table of ended rooms kept for late polls (4,096 rooms per engine connection):
+16 MiB of daemon memory per room here (and 16 MiB pushed to the engine, 16 MiB in the log),
up to 4,096 x ``peer.max_message_bytes`` (64 MiB) per prefill engine connection. Any reason a
peer sends (a TransferStatus's, an AbortTransfer's) took the same way.

Invariants: a room keeps, logs and reports a reason of bounded length (a peer's text is cut);
memory stays bounded; the daemon keeps serving a fresh byte-exact room."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.core.rooms import MAX_REASON
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory, _fresh_room_works
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

JUNK, COUNT = 16 << 20, 8



def _fail_rooms(m: Mallory, key: str, pc, first: int) -> None:
    for room in range(first, first + COUNT):
        m.send(p.TransferRequest(src=m.address, token="", room=room, transfer_id=1000 + room, pool_key=key,
                                 prefill_engine_id="P", sender_rank=0, dst_indices=np.array([room % 16]),
                                 dummy=False, deadline_s=30.0, confirms=True))
        m.send(p.RoomOutcome(src=m.address, token="", room=room, transfer_id=1000 + room, pool_key=key,
                             sender_rank=0, ok=False, reason=chr(65 + room % 26) * JUNK))
    for room in range(first, first + COUNT):  # the engine hears each room's end (released)
        st = pc.wait_released(room, timeout=30)
        assert st.state == "failed" and len(st.reason) <= MAX_REASON + 64, len(st.reason)


def test_a_peers_long_reason_is_cut_not_kept(daemons, tmp_path: Path) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    m = Mallory(tmp_path, pre)
    try:
        with pre.client(timeout=60) as pc, HostPool.create(pl) as ph:
            pc.register_pool(pl, ph, bootstrap=pre.address)
            key = f"{m.address}#reason"
            m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout=dl.to_dict(),
                                  buffers=[(1 << 40) + b * dl.buffer_bytes for b in range(dl.num_buffers)],
                                  session_id="127.0.0.1:1", prefill_engine_id="P"))
            assert m.expect(p.PoolAck).ok
            _fail_rooms(m, key, pc, 0)  # a first round: what buffers and the allocator take for them
            before = _rss_mib(pre.proc.pid)
            _fail_rooms(m, key, pc, COUNT)
            grown = _rss_mib(pre.proc.pid) - before
            # 128 MiB more went by; the daemon keeps none of it (before: +128 MiB, for good). What
            # the allocator holds on to of the transient frames varies (up to 48 MiB seen in CI).
            assert grown < 96, f"the prefill daemon kept {grown} MiB of peers' failure reasons"
            assert pc.poll(COUNT).reason.startswith("receiver failed the room: " + chr(65 + COUNT))
        assert pre.log_path.stat().st_size < 8 << 20, "a peer's reason went into the log whole"
        _fresh_room_works(pre, dec, pl, dl)
    finally:
        m.close()
