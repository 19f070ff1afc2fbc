"""The staged path end to end, byte for byte: real daemons with staging on, real Mooncake TCP,
fake engine rank processes; chunking of long contexts through a small staging pool; the
per-slice fallback for a peer without staging; MLA beside staging; what kvctl shows."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.support import check_reports, run_cluster

pytestmark = pytest.mark.e2e

STAGED = ("--staging-enabled", "--staging-pool-bytes", "4MiB", "--staging-chunk-tokens", "8",
          "--timeouts-waiting-s", "20", "--timeouts-transfer-s", "20")


def staged_pair(daemons, prefill_flags=STAGED, decode_flags=STAGED):
    return daemons("prefill", *prefill_flags), daemons("decode", *decode_flags)


def paths(daemon) -> dict:
    return daemon.status()["daemon"]["rooms_by_path"]


def staging(daemon) -> dict:
    return daemon.status()["daemon"]["staging"]


@pytest.mark.parametrize("prefill_tp, decode_tp, kv_heads, page_size", [
    (2, 1, 4, 4), (4, 1, 8, 4), (1, 2, 4, 4), (1, 4, 8, 1), (2, 4, 8, 4), (4, 2, 8, 16), (8, 2, 8, 4),
    (4, 2, 2, 4), (2, 4, 2, 4), (2, 8, 2, 2),  # GQA: replicated heads, dummy senders
    (3, 1, 6, 4), (1, 3, 6, 4), (6, 2, 6, 4),  # TP sizes that are not powers of two
    (2, 3, 6, 4),  # nor divide each other: decode rank 1 takes one head from each sender
])
def test_staged_hetero_tp_byte_exact(daemons, prefill_tp, decode_tp, kv_heads, page_size):
    prefill, decode = staged_pair(daemons)
    check_reports(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, kv_heads=kv_heads,
                              page_size=page_size, head_dim=8, pages_per_room=6, timeout=40))
    assert set(paths(decode)) == {"staged"}, paths(decode)
    for d in (prefill, decode):
        st = staging(d)
        assert st["whole"] and st["reserved_bytes"] == 0 and st["in_use_bytes"] == 0, st
    assert not decode.status()["daemon"]["errors"]


def test_writers_of_unequal_width_go_direct_beside_staging(daemons):
    """TP 3 -> 2 with 6 kv heads: decode rank 0 takes heads 0-1 from prefill rank 0 and head 2
    from rank 1. A staged region holds writers of one width, so the room goes direct (per-slice
    writes), byte-exact, with staging on at both daemons."""
    prefill, decode = staged_pair(daemons)
    check_reports(run_cluster(prefill, decode, prefill_tp=3, decode_tp=2, kv_heads=6, page_size=4, head_dim=8,
                              pages_per_room=6, timeout=40))
    assert set(paths(decode)) == {"direct"}, paths(decode)
    assert not decode.status()["daemon"]["errors"]


@pytest.mark.parametrize("prefill_tp, decode_tp, kv_heads", [(4, 1, 8), (4, 2, 2), (3, 1, 6)])
def test_whole_row_writers_skip_the_gather_when_their_pages_run(daemons, prefill_tp, decode_tp, kv_heads):
    """A sender whose head slice is its whole row (TP N -> smaller) writes a chunk whose tokens lie
    in a few runs straight from its pool (no gather, same block layout): byte-exact, and a room
    of scattered pages is still gathered."""
    flags = (*STAGED[:3], "--staging-chunk-tokens", "32", *STAGED[5:])
    prefill, decode = staged_pair(daemons, flags, flags)
    shape = {"prefill_tp": prefill_tp, "decode_tp": decode_tp, "kv_heads": kv_heads, "head_dim": 8,
             "page_size": 2, "pages_per_room": 24, "num_pages": 128, "timeout": 40}
    check_reports(run_cluster(prefill, decode, contiguous=True, **shape))
    sent = staging(prefill)["chunks_sent"]
    assert sent.get("ungathered", 0) > 0 and not sent.get("gathered"), sent
    check_reports(run_cluster(prefill, decode, **shape))  # scattered pages: 16 runs a chunk
    assert staging(prefill)["chunks_sent"].get("gathered", 0) > 0, staging(prefill)
    assert set(paths(decode)) == {"staged"}, paths(decode)
    assert not decode.status()["daemon"]["errors"]


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn"])
def test_staged_other_dtypes(daemons, dtype):
    prefill, decode = staged_pair(daemons)
    check_reports(run_cluster(prefill, decode, prefill_tp=2, decode_tp=1, dtype=dtype, head_dim=8, timeout=40))
    assert set(paths(decode)) == {"staged"}


def test_long_context_goes_chunk_by_chunk_through_a_small_pool(daemons):
    """A scaled-down long context: 4,096 tokens per room, 4 rooms, through a 1 MiB staging pool
    (768 KiB receive ring), so every room is many chunks and the ring wraps and waits."""
    flags = ("--staging-enabled", "--staging-pool-bytes", "1MiB", "--staging-chunk-tokens", "256",
             "--timeouts-waiting-s", "60", "--timeouts-transfer-s", "60")
    prefill, decode = staged_pair(daemons, flags, flags)
    check_reports(run_cluster(prefill, decode, prefill_tp=4, decode_tp=1, kv_heads=8, layers=2, head_dim=16,
                              page_size=16, num_pages=1024, rooms=4, pages_per_room=256, chunk_pages=32,
                              timeout=120))
    assert paths(decode) == {"staged": 4}
    st = staging(decode)
    assert st["whole"] and st["pool_bytes"] == 1 << 20


@pytest.mark.parametrize("prefill_on, decode_on", [(False, True), (True, False)])
def test_peer_without_staging_gets_the_per_slice_path(daemons, prefill_on, decode_on):
    """Staging needs both sides: with one side off the room goes per-slice and still lands."""
    off = ("--timeouts-waiting-s", "20")
    prefill, decode = staged_pair(daemons, STAGED if prefill_on else off, STAGED if decode_on else off)
    check_reports(run_cluster(prefill, decode, prefill_tp=4, decode_tp=1, kv_heads=8, timeout=40))
    assert set(paths(decode)) == {"direct"}
    assert not decode.status()["daemon"]["errors"] and not prefill.status()["daemon"]["errors"]


def test_same_tp_keeps_the_direct_path_with_staging_on(daemons):
    """Short same-TP rooms (a few runs, a few KiB) are bulk writes already: no staging."""
    prefill, decode = staged_pair(daemons)
    check_reports(run_cluster(prefill, decode, prefill_tp=2, decode_tp=2, kv_heads=4, timeout=40))
    assert set(paths(decode)) == {"direct"}


def test_a_fragmented_same_tp_room_is_staged_between_real_daemons(daemons):
    """Same TP, random pages (many one-page runs), fragmented-room staging turned on: the decode
    daemon asks for the staged path, which gathers the runs into bulk writes; bytes and
    canaries checked by every rank."""
    # Opted in; 40 pages of 256 B per buffer: a long room only by a lowered same_tp_min_bytes.
    flags = (*STAGED, "--staging-same-tp-run-bytes", "256KiB", "--staging-same-tp-min-bytes", "4KiB")
    prefill, decode = staged_pair(daemons, flags, flags)
    check_reports(run_cluster(prefill, decode, prefill_tp=2, decode_tp=2, kv_heads=4, num_pages=256,
                              rooms=2, pages_per_room=40, chunk_pages=16, timeout=60))
    assert set(paths(decode)) == {"staged"}
    assert not decode.status()["daemon"]["errors"] and not prefill.status()["daemon"]["errors"]


def test_staging_from_the_environment(daemons):
    env = {"KVD_STAGING_ENABLED": "1", "KVD_STAGING_POOL_BYTES": "2MiB"}
    prefill = daemons("prefill", "--timeouts-waiting-s", "20", env=env)
    decode = daemons("decode", "--timeouts-waiting-s", "20", env=env)
    check_reports(run_cluster(prefill, decode, prefill_tp=1, decode_tp=2, kv_heads=4, timeout=40))
    assert set(paths(decode)) == {"staged"}
    assert staging(decode)["pool_bytes"] == 2 << 20


@pytest.mark.parametrize("prefill_tp, decode_tp", [(1, 1), (2, 4), (4, 1)])
def test_mla_beside_staging_takes_the_direct_path(daemons, prefill_tp, decode_tp):
    """Staging is a daemon setting and one node serves MLA and GQA engines at once: an MLA pool
    registers with staging on, needs no staging memory (whole rows, nothing to gather), and its
    rooms are byte-exact on the direct path; a GQA engine on the same daemons is still staged."""
    prefill, decode = staged_pair(daemons)
    check_reports(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, mla=True,
                              timeout=40))
    assert set(paths(decode)) == {"direct"}, paths(decode)
    check_reports(run_cluster(prefill, decode, prefill_tp=2, decode_tp=1, kv_heads=4, timeout=40))
    assert paths(decode).get("staged", 0) > 0, paths(decode)
    for d in (prefill, decode):
        assert staging(d)["reserved_bytes"] == 0 and staging(d)["in_use_bytes"] == 0
        assert not d.status()["daemon"]["errors"], d.status()["daemon"]["errors"]


def test_kvctl_shows_staging_use_and_the_staged_path(daemons):
    """While a room waits for prefill, the decode daemon already holds its first chunk regions
    (prefetch): kvctl shows the room as staged and the bytes reserved; afterwards all is free."""
    import json
    import subprocess
    import sys

    prefill, decode = staged_pair(daemons)
    pre = [PoolLayout("P", "prefill", 2, r, 2, 4, 8, "bfloat16", 4, 16) for r in range(2)]
    dec = PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 16)
    with HostPool.create(pre[0]) as h0, HostPool.create(pre[1]) as h1, HostPool.create(dec) as hd, \
            prefill.client() as pc, decode.client() as dc:
        for h in (h0, h1):
            h.fill(0x5A)
        ids = [pc.register_pool(lay, h, bootstrap=prefill.address) for lay, h in zip(pre, (h0, h1), strict=True)]
        did = dc.register_pool(dec, hd)
        dc.recv(did, 3, prefill.address, "P", np.arange(4, 10))
        shown = {}
        for _ in range(100):
            out = subprocess.run([sys.executable, "-m", "kvd.kvctl", "status", "--socket", decode.socket_path,
                                  "--json"], capture_output=True, text=True, check=True)
            shown = json.loads(out.stdout)
            if shown["daemon"]["staging"]["reserved_bytes"] > 0:
                break
        assert shown["daemon"]["staging"]["reserved_bytes"] > 0, shown["daemon"]["staging"]
        assert [r["path"] for r in shown["rooms"]] == ["staged"]
        table = subprocess.run([sys.executable, "-m", "kvd.kvctl", "status", "--socket", decode.socket_path],
                               capture_output=True, text=True, check=True).stdout
        assert "staged 0/3" in table and "staging" in table  # 24 tokens in chunks of 8, none scattered yet
        for pid in ids:
            pc.send(pid, 3, np.arange(0, 6), True, aux=b"done")
        assert dc.wait(3, timeout=20).aux == b"done"
        dc.wait_released(3, timeout=20)
        for b in range(dec.num_buffers):
            assert np.all(hd.buffer(b)[4 * 4:10 * 4] == 0x5A) and not np.any(hd.buffer(b)[:16])
    st = staging(decode)
    assert st["whole"] and st["reserved_bytes"] == 0
