"""Red team: on the staged path, rooms whose prefill side never sends hold the decode daemon's
staging space, and a healthy prefill's room waits behind them.

A staged receiver reserves its first ``staging.prefetch_chunks`` chunk regions as soon as the
room is bootstrapped, before the prefill side has sent anything, and holds them until the room
ends (its deadline: ``timeouts.waiting_s``, 300 s by default). Four rooms from a stalled prefill
daemon (mallory: an authorized peer, TP 2, that accepts the pool and the staging grants and then
writes nothing, answering heartbeats) fill a small receive ring; the next room, from a healthy
prefill daemon that sends at once, waits for space, and fails at its own deadline ("no staging
space for 2048 bytes before the room's deadline"): the stalled rooms give their space back only
once released, after their deadline and the abort fence. With a
ring of production size the same takes rooms from a few slow prefill engines (a long prefill
queue) instead: every decode room of the node then waits on them.

Invariant: a stalled peer never delays others (README, "Guarantees under faults"); other rooms
are unaffected. This file is a failing test only: the fix (reserving regions for a room only
once its senders have something to write, or holding rooms that have not started to a share of
the ring) is a design choice for the maintainers."""

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
SEED, CANARY, STALLED = 5, 0x5A, 8
CHUNK_BYTES = 4 * 2 * 2 * 2 * 16 * 2  # 4 tokens x (2 layers x K/V) x 2 heads x 16 x bf16


def _started_then_stalled(m: Mallory, rooms: int) -> None:
    """Mallory as a TP 2 prefill engine "M" on the staged path: topology, pool accepted with
    staging, every request taken; then nothing is written."""
    layouts = [PoolLayout("M", "prefill", 2, r, num_pages=64, **SHAPE).to_dict() for r in range(2)]
    requests = reported = 0
    deadline = time.monotonic() + 20
    settle = float("inf")  # once every request came: one more second of answering grants
    while time.monotonic() < min(deadline, settle):
        if requests == 2 * rooms and settle == float("inf"):
            settle = time.monotonic() + 1.0
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
        elif isinstance(msg, p.StagingGrant) and msg.chunk == 0:
            # "written": one report per writer starts the room, which then holds its regions
            m.send(p.ChunkWritten(src=m.address, token="", room=msg.room, transfer_id=msg.transfer_id,
                                  pool_key=msg.pool_key, sender_rank=msg.sender_rank, chunk=0, nbytes=CHUNK_BYTES))
            reported += 1
    assert requests == 2 * rooms, f"mallory got {requests} requests"
    assert reported > 0, "no room was granted its first chunk"


def test_rooms_of_a_prefill_that_stalls_after_one_chunk_do_not_hold_up_a_healthy_ones(daemons, tmp_path: Path) -> None:
    pre, dec = daemons("prefill", *STAGED), daemons("decode", *STAGED)
    pls = [PoolLayout("P", "prefill", 2, r, num_pages=64, **SHAPE) for r in range(2)]
    dl = PoolLayout("D", "decode", 1, 0, num_pages=64, **SHAPE)
    phs = [HostPool.create(lay) for lay in pls]
    dh = HostPool.create(dl)
    for ph, lay in zip(phs, pls, strict=True):
        fill_prefill(ph, lay, SEED)
    fill_canary(dh, CANARY)
    m = Mallory(tmp_path, dec)
    try:
        with dec.client() as dc, pre.client() as c0, pre.client() as c1:
            pids = [c.register_pool(lay, ph, bootstrap=pre.address)
                    for c, lay, ph in zip((c0, c1), pls, phs, strict=True)]
            did = dc.register_pool(dl, dh)
            for i in range(STALLED):  # 2 pages = 2 chunks of 4 tokens each: 4 KiB of the 12 KiB ring
                dc.recv(did, 100 + i, m.address, "M", [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3])
            _started_then_stalled(m, STALLED)
            time.sleep(0.5)
            t0 = time.monotonic()
            dc.recv(did, 200, pre.address, "P", [60, 61])
            for c, pid in zip((c0, c1), pids, strict=True):
                c.send(pid, 200, [3, 4], True, aux=b"fast")
            assert dc.wait(200, timeout=30).aux == b"fast"
            took = time.monotonic() - t0
            assert verify_decode(dh, dl, pages_to_tokens([3, 4], dl.page_size), pages_to_tokens([60, 61], dl.page_size),
                                 SEED, CANARY, ignore_tokens=pages_to_tokens(list(range(4 * STALLED)), dl.page_size)) == []
        assert dec.status()["daemon"]["rooms_by_path"].get("staged", 0) >= STALLED + 1, "not the staged path"
        assert took < 3.0, f"a healthy prefill's room waited {took:.1f} s behind rooms of a stalled one"
    finally:
        m.close()
        for pool in (*phs, dh):
            pool.close()
