"""Red team: on the staged path, rooms whose prefill side stalls hold the decode daemon's staging
space, and a healthy prefill's room waits behind them.

A staged receiver reserves chunk regions of its receive ring for a room's writers (grants) and
holds them until the room ends: its deadline (``timeouts.waiting_s``, 300 s by default) plus the
abort fence. Mallory, an authorized peer playing a TP 2 prefill engine, accepts the pool and the
staging grants and then writes nothing (or reports the first chunk of each room and then nothing:
a room that has started holds its regions too), answering heartbeats. Before the fix its rooms
filled a small receive ring and the next room, from a healthy prefill daemon that sends at once,
failed at its own deadline ("no staging space for 2048 bytes before the room's deadline"); with a
ring of production size the same takes a few slow prefill engines.

Invariant: a stalled peer never delays others (README, "Guarantees under faults"): the regions
granted and not yet written, over all rooms, stay within half the ring, so a healthy room gets
space at once and is byte-exact; the stalled rooms' pages are left alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import Mallory
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=16, dtype="bfloat16", page_size=4)
STAGED = ("--staging-enabled", "--staging-pool-bytes", "16KiB", "--staging-chunk-tokens", "4",
          "--timeouts-waiting-s", "12", "--timeouts-bootstrap-s", "6", "--timeouts-transfer-s", "12",
          "--timeouts-abort-fence-s", "2")
SEED, CANARY = 5, 0x5A
CHUNK_BYTES = 4 * 2 * 2 * 2 * 16 * 2  # 4 tokens x (2 layers x K/V) x 2 heads x 16 x bf16


def _stalled_prefill(m: Mallory, rooms: int, *, first_chunk: bool) -> None:
    """Mallory as a TP 2 prefill engine "M" on the staged path: topology, pool accepted with
    staging, every request taken; then nothing is written, or (``first_chunk``) each writer
    reports chunk 0 of every room and nothing after it."""
    layouts = [PoolLayout("M", "prefill", 2, r, num_pages=64, **SHAPE).to_dict() for r in range(2)]
    requests = reported = 0
    deadline = time.monotonic() + 20
    settle = float("inf")  # once every request came: one more second of answering grants
    while time.monotonic() < min(deadline, settle):
        if requests == 2 * rooms and settle == float("inf"):
            settle = time.monotonic() + (1.0 if first_chunk else 0.0)
        try:
            msg = m._got.get(timeout=0.1)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        if isinstance(msg, p.EngineQuery):
            m.send(p.EngineInfo(src=m.address, token="", engine_id="M", ready=True, tp_size=2, layouts=layouts,
                                daemons=[m.address, m.address]))
        elif isinstance(msg, p.PoolAnnounce):
            m.send(p.PoolAck(src=m.address, token="", pool_key=msg.pool_key, ok=True, staging=True,
                             send_ring_bytes=1 << 20))
        elif isinstance(msg, p.TransferRequest):
            assert msg.chunk_tokens > 0, "the stalled rooms are not on the staged path"
            requests += 1
        elif first_chunk and isinstance(msg, p.StagingGrant) and msg.chunk == 0:
            # "written": one report per writer starts the room, which then holds its regions
            m.send(p.ChunkWritten(src=m.address, token="", room=msg.room, transfer_id=msg.transfer_id,
                                  pool_key=msg.pool_key, sender_rank=msg.sender_rank, chunk=0, nbytes=CHUNK_BYTES))
            reported += 1
    assert requests == 2 * rooms, f"mallory got {requests} requests"
    assert reported > 0 or not first_chunk, "no room was granted its first chunk"


@pytest.mark.parametrize(("first_chunk", "stalled", "pages_each"), [(False, 4, 2), (True, 8, 4)],
                         ids=["never-writes", "stalls-after-one-chunk"])
def test_rooms_of_a_stalled_prefill_do_not_hold_up_a_healthy_ones(daemons, tmp_path: Path, first_chunk: bool,
                                                                  stalled: int, pages_each: int) -> None:
    pre, dec = daemons("prefill", *STAGED), daemons("decode", *STAGED)
    pls = [PoolLayout("P", "prefill", 2, r, num_pages=64, **SHAPE) for r in range(2)]
    dl = PoolLayout("D", "decode", 1, 0, num_pages=64, **SHAPE)
    phs = [HostPool.create(lay) for lay in pls]
    dh = HostPool.create(dl)
    for ph, lay in zip(phs, pls, strict=True):
        fill_prefill(ph, lay, SEED)
    fill_canary(dh, CANARY)
    m = Mallory(tmp_path, dec)
    healthy = [60, 61]
    try:
        with dec.client() as dc, pre.client() as c0, pre.client() as c1:
            pids = [c.register_pool(lay, ph, bootstrap=pre.address)
                    for c, lay, ph in zip((c0, c1), pls, phs, strict=True)]
            did = dc.register_pool(dl, dh)
            for i in range(stalled):  # a page = a chunk of 4 tokens: 2 KiB of the ring per page
                dc.recv(did, 100 + i, m.address, "M", list(range(pages_each * i, pages_each * (i + 1))))
            _stalled_prefill(m, stalled, first_chunk=first_chunk)
            time.sleep(0.5)
            t0 = time.monotonic()
            dc.recv(did, 200, pre.address, "P", healthy)
            for c, pid in zip((c0, c1), pids, strict=True):
                c.send(pid, 200, [3, 4], True, aux=b"fast")
            assert dc.wait(200, timeout=30).aux == b"fast"
            took = time.monotonic() - t0
            stalled_pages = list(range(pages_each * stalled))
            assert verify_decode(dh, dl, pages_to_tokens([3, 4], dl.page_size), pages_to_tokens(healthy, dl.page_size),
                                 SEED, CANARY, ignore_tokens=pages_to_tokens(stalled_pages, dl.page_size)) == []
        assert dec.status()["daemon"]["rooms_by_path"].get("staged", 0) >= stalled + 1, "not the staged path"
        assert took < 3.0, f"a healthy prefill's room waited {took:.1f} s behind rooms of a stalled one"
    finally:
        m.close()
        for pool in (*phs, dh):
            pool.close()
