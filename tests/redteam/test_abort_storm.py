"""Red team: an abort storm on the staged path (prefill TP 2 -> decode TP 1, GQA-free 4 heads)
with a tiny staging pool, while the prefill engine keeps sending every room, and room ids reused.

Invariants: after an aborted room is released, nothing lands in its pages (a fresh sentinel
written there after the release survives the prefill side sending the room anyway); the rooms
not aborted are byte-exact; a released room id can be reused at once for a byte-exact room; a
room id still in flight is refused with a clear error; the daemons keep serving."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.engineclient.replies import KvdError
from kvd.layout import PoolLayout
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=16, dtype="bfloat16", page_size=4)
STAGED = ("--staging-enabled", "--staging-pool-bytes", "16KiB", "--staging-chunk-tokens", "4",
          "--timeouts-waiting-s", "10", "--timeouts-bootstrap-s", "6", "--timeouts-transfer-s", "10",
          "--timeouts-abort-fence-s", "2")
SEED, CANARY, AFTER = 7, 0x5A, 0xC3
ROOMS, PER = 24, 2


def test_abort_storm_on_the_staged_path_lands_nothing_after_release(daemons) -> None:
    pre, dec = daemons("prefill", *STAGED), daemons("decode", *STAGED)
    pls = [PoolLayout("P", "prefill", 2, r, num_pages=64, **SHAPE) for r in range(2)]
    dl = PoolLayout("D", "decode", 1, 0, num_pages=ROOMS * PER + 8, **SHAPE)
    phs = [HostPool.create(lay) for lay in pls]
    dh = HostPool.create(dl)
    for ph, lay in zip(phs, pls, strict=True):
        fill_prefill(ph, lay, SEED)
    fill_canary(dh, CANARY)
    rooms = list(range(300, 300 + ROOMS))
    src = {r: [2 * i, 2 * i + 1] for i, r in enumerate(rooms)}
    dst = {r: [PER * i + 1, PER * i] for i, r in enumerate(rooms)}  # reversed: a page order of its own
    aborted = set(rooms[::2])
    try:
        with dec.client() as dc, pre.client() as c0, pre.client() as c1:
            pids = [c.register_pool(lay, ph, bootstrap=pre.address) for c, lay, ph in zip((c0, c1), pls, phs,
                                                                                             strict=True)]
            did = dc.register_pool(dl, dh)
            for r in rooms:
                dc.recv(did, r, pre.address, "P", dst[r])
            with pytest.raises(KvdError):  # a room id still in flight is refused
                dc.recv(did, rooms[0], pre.address, "P", [ROOMS * PER])
            for r in sorted(aborted):
                dc.abort(did, r)
            t0 = time.monotonic()
            for r in sorted(aborted):
                assert dc.wait_released(r, timeout=20).released
            assert time.monotonic() - t0 < 10 + 2 + 2, "released later than the fence allows"
            for r in aborted:  # the engine reuses the pages at once
                for b in range(dl.num_buffers):
                    for page in dst[r]:
                        dh.buffer(b)[page * dl.page_size:(page + 1) * dl.page_size] = AFTER
            reuse = rooms[0]  # aborted; its prefill engine never sends it, and reuses the id below
            for r in rooms[1:]:  # the prefill engine sends every other room anyway, in two chunks
                for c, pid in zip((c0, c1), pids, strict=True):
                    with contextlib.suppress(KvdError):
                        c.send(pid, r, src[r][:1], False)
                        c.send(pid, r, src[r][1:], True, aux=r.to_bytes(4, "little"))
            for r in rooms:
                if r not in aborted:
                    assert dc.wait(r, timeout=30).aux == r.to_bytes(4, "little")
            time.sleep(1.0)  # anything late would land now
            for r in aborted:
                for b in range(dl.num_buffers):
                    for page in dst[r]:
                        got = dh.buffer(b)[page * dl.page_size:(page + 1) * dl.page_size]
                        assert (got == AFTER).all(), f"bytes landed in released room {r} page {page}"
            ok = [r for r in rooms if r not in aborted]
            s_tok = np.concatenate([pages_to_tokens(src[r], dl.page_size) for r in ok])
            d_tok = np.concatenate([pages_to_tokens(dst[r], dl.page_size) for r in ok])
            ignore = np.concatenate([pages_to_tokens(dst[r], dl.page_size) for r in sorted(aborted)])
            assert verify_decode(dh, dl, s_tok, d_tok, SEED, CANARY, ignore_tokens=ignore) == []
            # A released room id is reused at once, byte-exact, into the pages of an aborted room.
            fill_canary(dh, CANARY)
            dc.recv(did, reuse, pre.address, "P", [ROOMS * PER + 2, ROOMS * PER + 3])
            for c, pid in zip((c0, c1), pids, strict=True):
                c.send(pid, reuse, [60, 61], True, aux=b"again")
            assert dc.wait(reuse, timeout=30).aux == b"again"
            assert verify_decode(dh, dl, pages_to_tokens([60, 61], dl.page_size),
                                 pages_to_tokens([ROOMS * PER + 2, ROOMS * PER + 3], dl.page_size),
                                 SEED, CANARY) == []
        assert dec.status()["daemon"]["rooms_by_path"].get("staged", 0) >= ROOMS // 2 + 1, "not the staged path"
        assert pre.alive() and dec.alive()
    finally:
        for pool in (*phs, dh):
            pool.close()
