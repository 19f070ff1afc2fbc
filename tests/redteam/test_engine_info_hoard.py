"""Red team: an authorized peer (mallory) sends a decode daemon 8 ready EngineInfo answers that
nobody asked for, about engines with short, valid ids, each carrying 16 MiB in its layout map
(a key no layout has) or in its ``error`` text.

test_directory_memory bounds the engine ids of such answers, but the client role still kept
every ready answer (4,096 engines) whole, whoever sent it and however big: +16 MiB of daemon
memory per message here, up to 4,096 x ``peer.max_message_bytes`` (64 MiB) in general, for as
long as the daemon ran (an answer is dropped only when its directory goes quiet or restarts,
and mallory answers heartbeats).

Invariants: a daemon keeps a directory's answer only about an engine it asked that directory
about (an unasked one is counted as ``stale_message`` and dropped); memory stays bounded; rooms
that do ask a directory still get their answers (a fresh byte-exact room)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory, _fresh_room_works
from tests.redteam.mallory import rss_mib as _rss_mib

pytestmark = pytest.mark.e2e

JUNK, COUNT = 16 << 20, 8



def _answers(m: Mallory, first: int) -> None:
    for i in range(first, first + COUNT):
        engine = f"E{i}"
        layout = PoolLayout(engine, "prefill", 1, 0, **SHAPE).to_dict()
        big = bytes([i]) * JUNK
        m.send(p.EngineInfo(src=m.address, token="", engine_id=engine, ready=True, tp_size=1,
                            layouts=[{**layout, "junk": big}] if i % 2 else [layout], daemons=[m.address],
                            error="" if i % 2 else big.decode("latin-1")))


def _stale(d) -> int:
    return int(d.status()["daemon"]["errors"].get("stale_message", 0))


def _handled(m: Mallory, barrier: str) -> None:
    """Wait until the daemon has handled what mallory sent so far: it handles one peer's messages
    in order, and answers a query about an engine (as a directory) when it comes to it."""
    m.send(p.EngineQuery(src=m.address, token="", engine_id=barrier))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if m.expect(p.EngineInfo, timeout=60).engine_id == barrier:
            return
    raise AssertionError("no answer to the barrier query")


def test_engine_info_nobody_asked_for_is_not_kept(daemons, tmp_path: Path) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    m = Mallory(tmp_path, dec)
    try:
        _answers(m, 0)  # a first round: what the daemon's buffers and allocator take for them
        _handled(m, "barrier-1")
        before = _rss_mib(dec.proc.pid)
        _answers(m, COUNT)
        _handled(m, "barrier-2")
        grown = _rss_mib(dec.proc.pid) - before
        # 128 MiB more went by; the daemon keeps none of it (before: +128 MiB, for good).
        assert grown < 48, f"the decode daemon kept {grown} MiB of EngineInfo answers nobody asked for"
        assert _stale(dec) >= 2 * COUNT, "answers nobody asked for were dropped without a counter"
        _fresh_room_works(pre, dec, PoolLayout("P", "prefill", 1, 0, **SHAPE),
                          PoolLayout("D", "decode", 1, 0, **SHAPE))
    finally:
        m.close()
