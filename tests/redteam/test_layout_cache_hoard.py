"""Red team: layouts that carry extra keys, 16 MiB of distinct bytes each: 8 RegisterPools from a
local engine (any user in ``socket.group``; the registrations themselves fail, naming no
descriptor) and 8 PoolAnnounces from an authorized peer (mallory), then layouts whose
``is_mla`` / ``hisparse`` (booleans) are 16 MiB byte strings.

``PoolLayout.from_dict`` caches every valid layout it parses (1,024 of them), keyed by *every*
item of the map, the keys a layout does not have included: each cached key kept its 16 MiB
(+128 MiB of daemon memory per 8 messages here, for as long as the daemon ran; 1,024 x 64 MiB,
``socket.max_frame_bytes`` / ``peer.max_message_bytes``, in general). A layout field of the
wrong type was kept too (a truthy string passed for ``is_mla`` of a one-head pool).

Invariants: what a cached layout keeps is its own fields (a layout field of the wrong type is
refused with a clear error, counted); the daemon's memory stays bounded whatever else a map
carries; the daemon keeps serving a fresh byte-exact room."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire.codec import decode
from kvd.wire.engine import ErrorReply, RegisterPool
from kvd.wire.framing import frame
from tests.redteam.mallory import FLAGS, SHAPE, Mallory, _fresh_room_works
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

JUNK, COUNT = 16 << 20, 8



def _reply(s: socket.socket) -> ErrorReply:
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        body += s.recv(size - len(body))
    msg = decode(body)
    assert isinstance(msg, ErrorReply), msg
    return msg


def _register_with_junk(s: socket.socket, layout: PoolLayout, first: int) -> None:
    for i in range(first, first + COUNT):
        s.sendall(frame(RegisterPool(req_id=i + 1, layout={**layout.to_dict(), "junk": bytes([i]) * JUNK},
                                     memory={"kind": "fd", "ticket": "none"}).encode()))
        assert _reply(s).kind == "registration"


def _announce_with_junk(m: Mallory, layout: PoolLayout, first: int) -> None:
    for i in range(first, first + COUNT):
        key = f"{m.address}#junk{i}"
        m.send(p.PoolAnnounce(src=m.address, token="", pool_key=key, layout={**layout.to_dict(), "junk": bytes([i]) * JUNK},
                              buffers=[(1 << 40) + b * layout.buffer_bytes for b in range(layout.num_buffers)],
                              session_id="127.0.0.1:1", prefill_engine_id="P"))
        assert m.expect(p.PoolAck, timeout=30).pool_key == key


def test_extra_layout_keys_are_not_kept(daemons, tmp_path: Path) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    pl = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    m = Mallory(tmp_path, pre)
    try:
        with socket.socket(socket.AF_UNIX) as s, pre.client() as pc, HostPool.create(pl) as ph:
            s.connect(pre.socket_path)  # a local engine
            s.settimeout(60)
            pc.register_pool(pl, ph, bootstrap=pre.address)  # the prefill engine the announces name
            # A first round: what the daemon's buffers and allocator take for 16 MiB messages.
            _register_with_junk(s, pl, 0)
            _announce_with_junk(m, dl, 0)
            before = _rss_mib(pre.proc.pid)
            _register_with_junk(s, pl, COUNT)  # a local engine
            _announce_with_junk(m, dl, COUNT)  # an authorized peer
            grown = _rss_mib(pre.proc.pid) - before
            # 2 x 128 MiB more went by; the daemon keeps none of it (before: +256 MiB, for good).
            assert grown < 48, f"the prefill daemon kept {grown} MiB of layout maps' extra keys"
            # A boolean field holding bytes is refused for what it is, not parsed into a layout.
            s.sendall(frame(RegisterPool(req_id=99, layout={**pl.to_dict(), "total_kv_heads": 1,
                                                            "is_mla": b"\x01" * JUNK},
                                         memory={"kind": "fd", "ticket": "none"}).encode()))
            refused = _reply(s)
            assert refused.kind == "layout" and "is_mla must be a boolean" in refused.message
            assert len(refused.message) < 4096
            m.send(p.PoolAnnounce(src=m.address, token="", pool_key=f"{m.address}#bool",
                                  layout={**dl.to_dict(), "hisparse": b"\x01" * JUNK, "page_size": 1},
                                  buffers=[0] * dl.num_buffers, session_id="127.0.0.1:1", prefill_engine_id="P"))
            ack = m.expect(p.PoolAck, timeout=30)
            assert not ack.ok and "hisparse must be a boolean" in ack.error and len(ack.error) < 4096
            assert pre.status()["daemon"]["errors"].get("layout", 0) >= 1
        _fresh_room_works(pre, dec, pl, dl)
    finally:
        m.close()
