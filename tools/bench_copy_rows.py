"""The one-pass row copy kernel alone on a GPU: device time against ``copy_`` of the same bytes.

    python3 tools/bench_copy_rows.py [--tokens 32768] [--tiles 4096,16384]

Each case is a TP pair's head slice (32 layers x K/V = 64 buffers, head_dim 128, bf16, pages of
16 tokens, scattered-free page lists): every sender rank's slice into one receiver's pool, the
ranks' kernels one after another on one stream and then all at once on one stream each (what a
prefill daemon serving several ranks does). Figures are ratios to a contiguous ``copy_`` of the
same byte count in the same run (device time: ten calls back to back per timing, so host launch
work is not counted); byte-exactness is checked against a torch reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = [  # name, kv heads, sender TP, receiver TP
    ("TP 4->1", 8, 4, 1),
    ("TP 1->4", 8, 1, 4),
    ("TP 2->1", 8, 2, 1),
    ("GQA 2 heads 4->1", 2, 4, 1),
    ("GQA 2 heads 1->4", 2, 1, 4),
]


def _time(torch, fn, reps: int = 5, inner: int = 10) -> float:
    """Median device seconds of one ``fn`` (CUDA events around ``inner`` calls back to back on
    the current stream, so the host's launch work overlaps the device's and is not counted)."""
    fn()
    out = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(begin.elapsed_time(end) / 1e3 / inner)
    return statistics.median(out)


def run_case(torch, name: str, heads: int, stp: int, rtp: int, tokens: int, tiles: list[int]) -> list[str]:
    import numpy as np
    from kvd_kernels.copy_kernels import copy_rows_triton

    from kvd.core.heads import map_heads
    from kvd.core.layout import PoolLayout

    page, layers, hd = 16, 32, 128
    pages = tokens // page
    lay = {role: PoolLayout("E", role, tp, 0, layers, heads, hd, "bfloat16", page, pages, memory_kind="gpu")
           for role, tp in (("prefill", stp), ("decode", rtp))}
    s_row, d_row = lay["prefill"].token_bytes, lay["decode"].token_bytes
    nb = lay["prefill"].num_buffers
    dev = torch.device("cuda", 0)
    # Every sender rank's pool (sender ranks whose heads the receiver rank 0 needs).
    slices = [s for s in map_heads(heads, stp, rtp).slices_for(0)]
    senders = {s.sender_rank for s in slices}
    src = {r: torch.randint(0, 255, (nb, tokens * s_row), dtype=torch.uint8, device=dev) for r in senders}
    dst = torch.zeros((nb, tokens * d_row), dtype=torch.uint8, device=dev)
    rows = np.arange(pages, dtype=np.int64)
    perm = np.random.default_rng(0).permutation(pages)  # the receiver's pages are not the sender's
    hb = lay["prefill"].head_bytes

    # Addresses and page lists made once, on the device: the timings are the kernel's, not the
    # host's building of 128 addresses per call (which took longer than a 256-byte-run launch).
    src_addrs = {r: [int(src[r][b].data_ptr()) for b in range(nb)] for r in senders}
    dst_addrs = [int(dst[b].data_ptr()) for b in range(nb)]
    rows_dev = torch.as_tensor(rows, device=dev)
    perm_dev = torch.as_tensor(perm, device=dev)

    def launch(sl, block_bytes: int, buffer_major: bool | None = None) -> None:
        copy_rows_triton(src_addrs[sl.sender_rank], dst_addrs, rows_dev, perm_dev, s_row, d_row,
                         sl.src_head_offset * hb, sl.dst_head_offset * lay["decode"].head_bytes, sl.num_heads * hb,
                         dev, block_bytes=block_bytes, rows_per_index=page, buffer_major=buffer_major)

    nbytes = sum(sl.num_heads * hb for sl in slices) * tokens * nb
    flat_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    flat_b = torch.empty_like(flat_a)
    t_copy = _time(torch, lambda: flat_b.copy_(flat_a))
    lines = [f"{name}: {len(slices)} slice(s) from {len(senders)} sender rank(s), {nbytes / 2**30:.2f} GiB, "
             f"copy_ {nbytes / t_copy / 1e9:.0f} GB/s"]
    streams = [torch.cuda.Stream(device=dev) for _ in slices]
    for tile in tiles:
        t_serial = _time(torch, lambda tile=tile: [launch(sl, tile) for sl in slices])

        def concurrent(tile: int = tile) -> None:
            cur = torch.cuda.current_stream(dev)
            for sl, st in zip(slices, streams, strict=True):
                st.wait_stream(cur)
                with torch.cuda.stream(st):
                    launch(sl, tile)
            for st in streams:
                cur.wait_stream(st)

        t_conc = _time(torch, concurrent)
        lines.append(f"  tile {tile:>6} B: one stream {nbytes / t_serial / 1e9:6.0f} GB/s = {t_copy / t_serial:.3f} "
                     f"of copy_; {len(slices)} streams {nbytes / t_conc / 1e9:6.0f} GB/s = {t_copy / t_conc:.3f}")
    # The grid order the launch picks for large batches (buffer-major) against the other one.
    t_other = _time(torch, lambda: [launch(sl, 0, buffer_major=False) for sl in slices])
    t_own = _time(torch, lambda: [launch(sl, 0) for sl in slices])
    lines.append(f"  own launch {t_copy / t_own:.3f} of copy_; buffer-fastest order instead {t_copy / t_other:.3f}")
    # byte-exact: the receiver's rows hold each slice of the sender's rows (pages permuted)
    d = dst.view(nb, pages, page, d_row)
    ok = True
    for sl in slices:
        s = src[sl.sender_rank].view(nb, pages, page, s_row)
        want = s[:, :, :, sl.src_head_offset * hb:(sl.src_head_offset + sl.num_heads) * hb]
        got = d[:, torch.as_tensor(perm, device=dev), :,
                sl.dst_head_offset * hb:(sl.dst_head_offset + sl.num_heads) * hb]
        ok = ok and bool(torch.equal(want, got))
    lines.append(f"  byte-exact: {ok}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (a chunk of a long room)")
    ap.add_argument("--tiles", default="0,8192,16384,32768",
                    help="bytes per program to try (0: the kernel's own choice)")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}")
    for case in CASES:
        for line in run_case(torch, *case, a.tokens, [int(t) for t in a.tiles.split(",")]):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
