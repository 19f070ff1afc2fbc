"""Staged vs per-slice, on the same transport in the same run: write ops, throughput, and the
staged path against a raw Mooncake bulk write of the same bytes.

Every figure comes from real daemons on loopback (Mooncake TCP) and fake engine rank
processes, byte-checked; each run gets fresh daemons. Three parts:

1. write ops per request at the heterogeneous-TP benchmark shape (TP 4->1, 32 layers, 8 kv
   heads, head_dim 128, bf16, 4,096 tokens): per-slice ops are what the daemon's own planner
   plans for that request (running a million tiny writes takes minutes; ``--measure-per-slice``
   runs them), staged ops are counted by the prefill daemon while it moves the request;
2. throughput staged / per-slice at 1, 16 and 128 concurrent rooms, TP 4->1 and 1->4;
3. staged throughput / a raw bulk write of the same bytes.

    python3 tools/bench_staged.py            # all three (a few minutes on 2 cores)
    python3 tools/bench_staged.py --quick    # fewer rooms, smaller shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from tools.cluster import failures, run_cluster, start_daemon, throughput  # noqa: E402
from tools.raw_mooncake import measure_raw_write  # noqa: E402

STAGING = ("--staging-enabled", "--staging-pool-bytes", "1GiB", "--staging-chunk-bytes", "64MiB")


def run(staged: bool, prefill_tp: int, decode_tp: int, *, layers: int, tokens: int, rooms: int,
        kv_heads: int = 8, head_dim: int = 128, page_size: int = 16) -> dict:
    """One byte-checked batch with fresh daemons: bytes, seconds, write ops, paths."""
    pages = max(1, tokens // page_size)
    flags = ("--timeouts-waiting-s", "900", "--timeouts-transfer-s", "900") + (STAGING if staged else ())
    with tempfile.TemporaryDirectory(prefix="kvd-bench-") as tmp:
        prefill = start_daemon(Path(tmp), "prefill", *flags)
        decode = start_daemon(Path(tmp), "decode", *flags)
        try:
            reports = run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, kv_heads=kv_heads,
                                  layers=layers, head_dim=head_dim, page_size=page_size, num_pages=pages * rooms,
                                  rooms=rooms, pages_per_room=pages, chunk_pages=64, timeout=900,
                                  contiguous=True)
            ops = prefill.status()["daemon"]["write_ops_total"]
            paths = decode.status()["daemon"]["rooms_by_path"]
            kernels = {"gather_s": prefill.status()["daemon"]["staging"]["kernel_seconds"].get("gather", 0.0),
                       "scatter_s": decode.status()["daemon"]["staging"]["kernel_seconds"].get("scatter", 0.0)}
        finally:
            prefill.stop()
            decode.stop()
    bad = failures(reports)
    if bad:
        raise SystemExit(f"transfer failed: {bad}")
    nbytes, seconds = throughput(reports)
    return {"bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9, "write_ops": ops,
            "paths": paths, **kernels}


def planned_per_slice_ops(prefill_tp: int, decode_tp: int, *, layers: int, tokens: int, kv_heads: int = 8,
                          head_dim: int = 128, page_size: int = 16) -> int:
    """Write ops the per-slice planner makes for one request (every sender, every receiver)."""
    from kvd.layout import PoolLayout
    from kvd.planner import map_heads, pages_to_tokens, plan_direct_writes

    pages = np.arange(tokens // page_size, dtype=np.int64)
    total = 0
    mapping = map_heads(kv_heads, prefill_tp, decode_tp)
    for r in range(decode_tp):
        recv = PoolLayout("D", "decode", decode_tp, r, layers, kv_heads, head_dim, "bfloat16", page_size, len(pages))
        for s in mapping.required_senders(r):
            send = PoolLayout("P", "prefill", prefill_tp, s, layers, kv_heads, head_dim, "bfloat16", page_size,
                              len(pages))
            src_bufs = [(i + 1) << 32 for i in range(send.num_buffers)]
            dst_bufs = [(i + 1) << 32 for i in range(recv.num_buffers)]
            tok = pages_to_tokens(pages, page_size)
            for hs in mapping.slices_between(s, r):
                total += len(plan_direct_writes(send, src_bufs, tok, recv, dst_bufs, tok, hs).src)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/16/32 rooms and a 256 MiB raw comparison")
    ap.add_argument("--measure-per-slice", action="store_true",
                    help="also run the per-slice request of part 1 (about a million writes: minutes)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    out: dict = {}

    shape = dict(layers=32, tokens=4096)
    staged = run(True, 4, 1, rooms=1, **shape)
    planned = planned_per_slice_ops(4, 1, **shape)
    out["ops"] = {"per_slice_planned": planned, "staged": staged["write_ops"],
                  "ratio": planned / staged["write_ops"], "staged_gbps": staged["gbps"]}
    print(f"1. write ops per request, TP 4->1, 32 layers x 8 kv heads x 128, bf16, 4096 tokens: per-slice "
          f"{planned:,} (planned), staged {staged['write_ops']:,} (counted) -> {planned / staged['write_ops']:,.0f}x")
    if a.measure_per_slice:
        direct = run(False, 4, 1, rooms=1, **shape)
        out["ops"]["per_slice_counted"] = direct["write_ops"]
        print(f"   per-slice counted while running it: {direct['write_ops']:,} ops, {direct['gbps']:.3f} GB/s")

    rooms_list = (1, 16, 32) if a.quick else (1, 16, 128)
    small = dict(layers=4, tokens=64)
    print("2. throughput, 4 layers x 8 kv heads x 128, bf16, 64 tokens per room (1 MiB), same transport:")
    print(f"   {'TP':>6} {'rooms':>5} {'per-slice GB/s':>15} {'staged GB/s':>12} {'staged/per-slice':>17} "
          f"{'ops per-slice':>14} {'ops staged':>11}")
    out["throughput"] = []
    for tp in ((4, 1), (1, 4)):
        for rooms in rooms_list:
            d = run(False, *tp, rooms=rooms, **small)
            s = run(True, *tp, rooms=rooms, **small)
            assert set(s["paths"]) == {"staged"} and set(d["paths"]) == {"direct"}, (s["paths"], d["paths"])
            ratio = s["gbps"] / d["gbps"]
            out["throughput"].append({"tp": list(tp), "rooms": rooms, "per_slice_gbps": d["gbps"],
                                      "staged_gbps": s["gbps"], "ratio": ratio,
                                      "per_slice_ops": d["write_ops"], "staged_ops": s["write_ops"]})
            print(f"   {tp[0]}->{tp[1]:<3} {rooms:>5} {d['gbps']:>15.3f} {s['gbps']:>12.3f} {ratio:>16.1f}x "
                  f"{d['write_ops']:>14,} {s['write_ops']:>11,}")

    big = dict(layers=16, tokens=2048 if a.quick else 4096, rooms=2 if a.quick else 4)
    s = run(True, 4, 1, **big)
    raw_s = measure_raw_write(s["bytes"])
    raw_gbps = s["bytes"] / raw_s / 1e9
    out["vs_raw"] = {"bytes": s["bytes"], "staged_gbps": s["gbps"], "raw_gbps": raw_gbps,
                     "ratio": s["gbps"] / raw_gbps, "write_ops": s["write_ops"]}
    print(f"3. staged TP 4->1, 16 layers, {big['tokens']} tokens x {big['rooms']} rooms: "
          f"{s['bytes'] / 2**20:.0f} MiB at {s['gbps']:.3f} GB/s ({s['write_ops']} ops); raw Mooncake bulk "
          f"write of the same bytes {raw_gbps:.3f} GB/s -> staged/raw = {s['gbps'] / raw_gbps:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
