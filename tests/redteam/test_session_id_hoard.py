"""Red team: an authorized peer (mallory, posing as a decode daemon) announces decode pools whose
Mooncake session id is its own host and then 16 MiB of characters (``127.0.0.1:AAAA...``).

The ownership gate checks only the session's host (the part before the last colon), and the
directory kept the announce's session id in the remote pool as it came: every announce was
accepted and kept its 16 MiB (+128 MiB of prefill daemon memory per 8 announces here), up to
``peer.max_pools`` (1,024) x ``peer.max_message_bytes`` (64 MiB) per peer, for as long as the
peer keeps the pools in use.

Invariants: a session id is a name of at most 256 characters like the pool key beside it (a
longer one is refused with a clear error and counted as ``layout``); memory stays bounded; the
daemon keeps serving a fresh byte-exact room."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory, _fresh_room_works
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

JUNK, COUNT = 16 << 20, 8



def _announce(m: Mallory, dl: PoolLayout, first: int) -> list[p.PoolAck]:
    acks = []
    for i in range(first, first + COUNT):
        key = f"{m.address}#s{i}"
        m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout=dl.to_dict(),
                              buffers=[(1 << 40) + b * dl.buffer_bytes for b in range(dl.num_buffers)],
                              session_id="127.0.0.1:" + chr(65 + i) * JUNK, prefill_engine_id="P"))
        ack = m.expect(p.PoolAck, timeout=30)
        assert ack.pool_key == key
        acks.append(ack)
    return acks


def test_long_session_ids_are_refused_not_kept(daemons, tmp_path: Path) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    m = Mallory(tmp_path, pre)
    try:
        with pre.client() as pc, HostPool.create(pl) as ph:
            pc.register_pool(pl, ph, bootstrap=pre.address)  # the prefill engine the announces name
            _announce(m, dl, 0)  # a first round: what the daemon's buffers and allocator take for them
            before = _rss_mib(pre.proc.pid)
            acks = _announce(m, dl, COUNT)
            grown = _rss_mib(pre.proc.pid) - before
            # 128 MiB more went by; the daemon keeps none of it (before: +128 MiB, for good).
            assert grown < 48, f"the prefill daemon kept {grown} MiB of announced session ids"
            assert all(not a.ok and "session_id must be a non-empty string" in a.error and len(a.error) < 4096
                       for a in acks), acks[0].error[:200]
            assert pre.status()["daemon"]["remote_pools"] == 0
            assert pre.status()["daemon"]["errors"].get("layout", 0) >= 2 * COUNT
        _fresh_room_works(pre, dec, pl, dl)
    finally:
        m.close()
