"""Benchmark kvd end to end against a raw Mooncake bulk write of the same bytes, in one run.

Starts a prefill and a decode daemon on loopback, runs fake engine ranks at the chosen TP
sizes (one process per rank), times one batch of rooms from a common start barrier, reads
the write ops the prefill daemon issued, then measures a raw Mooncake write of the same
number of bytes over the same transport and prints the ratio.

    python tools/bench_transfer.py                       # same TP 1 -> 1
    python tools/bench_transfer.py --prefill-tp 4 --decode-tp 1 --layers 32 --tokens 4096
    python tools/bench_transfer.py --hisparse --page-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import run_cluster, start_daemon, throughput  # noqa: E402
from tools.raw_mooncake import measure_raw_write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per room")
    ap.add_argument("--rooms", type=int, default=1)
    ap.add_argument("--chunk-pages", type=int, default=64)
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--scattered", action="store_true",
                    help="random pages on both sides (default: each room is one contiguous page run)")
    ap.add_argument("--hisparse", action="store_true")
    ap.add_argument("--warm", action="store_true",
                    help="time a second round of the same rooms on the same pools (the first untimed), "
                         "against raw Mooncake's best of 3 writes into the same buffers")
    ap.add_argument("--staged", action="store_true", help="both daemons stage (hetero TP)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--daemon-flag", action="append", default=[],
                    help="extra flag for both daemons (repeatable), e.g. --daemon-flag=--staging-ungathered-max-runs=0")
    args = ap.parse_args(argv)
    pages_per_room = max(1, args.tokens // args.page_size)
    num_pages = pages_per_room * args.rooms
    with tempfile.TemporaryDirectory(prefix="kvd-bench-") as tmp:
        flags: tuple[str, ...] = ("--timeouts-waiting-s", "600", "--timeouts-transfer-s", "600")
        if args.staged:
            flags += ("--staging-enabled",)
        flags += tuple(args.daemon_flag)
        prefill = start_daemon(Path(tmp), "prefill", *flags)
        decode = start_daemon(Path(tmp), "decode", *flags)
        try:
            reports = run_cluster(prefill, decode, prefill_tp=args.prefill_tp, decode_tp=args.decode_tp,
                                  kv_heads=args.kv_heads, layers=args.layers, head_dim=args.head_dim,
                                  page_size=args.page_size, num_pages=num_pages, rooms=args.rooms,
                                  pages_per_room=pages_per_room, mla=args.mla, hisparse=args.hisparse,
                                  chunk_pages=args.chunk_pages, timeout=900,
                                  contiguous=not args.scattered, warm=args.warm)
            write_ops = prefill.status()["daemon"]["write_ops_total"]
        finally:
            prefill.stop()
            decode.stop()
    bad = [r for r in reports if not r.ok]
    if bad:
        for r in bad:
            print(f"FAILED {r.role} rank {r.rank}: {r.rooms_failed or r.mismatches[:3] or r.error}")
        return 1
    nbytes, seconds = throughput(reports)
    raw_s = measure_raw_write(nbytes)
    fig = {
        "prefill_tp": args.prefill_tp, "decode_tp": args.decode_tp, "layers": args.layers,
        "kv_heads": 1 if args.mla else args.kv_heads, "head_dim": args.head_dim,
        "page_size": args.page_size, "tokens_per_room": pages_per_room * args.page_size,
        "rooms": args.rooms, "path": "hisparse" if args.hisparse else "staged" if args.staged else "direct",
        "bytes": nbytes, "write_ops": write_ops, "kvd_seconds": round(seconds, 4),
        "kvd_gbps": round(nbytes / seconds / 1e9, 3), "raw_seconds": round(raw_s, 4),
        "raw_gbps": round(nbytes / raw_s / 1e9, 3), "kvd_over_raw": round(raw_s / seconds, 3),
    }
    print(("warm (second round on the same pools): " if args.warm else "") + f"kvd {fig['path']} TP {args.prefill_tp}->{args.decode_tp}, {args.layers} layers x "
          f"{fig['kv_heads']} kv heads x {args.head_dim}, {fig['tokens_per_room']} tokens x {args.rooms} rooms: "
          f"{nbytes / 2**20:.1f} MiB in {seconds * 1e3:.0f} ms = {fig['kvd_gbps']} GB/s, {write_ops} write ops")
    print(f"raw Mooncake bulk write of the same bytes: {raw_s * 1e3:.0f} ms = {fig['raw_gbps']} GB/s")
    print(f"kvd / raw throughput: {fig['kvd_over_raw']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
