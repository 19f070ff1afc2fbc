"""Benchmark the fused staging gather/scatter kernels against a device-to-device copy.

For each model shape, page size and token count it measures, in one run, the kernel's
time and a plain ``copy_`` of the same number of bytes, prints GB/s for both and the ratio
kernel/copy (the target is >= 0.92), and checks every result byte for byte against the
torch reference. Exits non-zero on any mismatch. Without CUDA it says so and exits 0;
``--check-only`` then runs the correctness cases on CPU under the Triton interpreter.

What it must never do: report a speed whose bytes and time come from different runs, or
a ratio against a copy measured on another device or in another process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """One transfer direction of one model: what the sender gathers, what the receiver scatters."""

    name: str
    num_layers: int
    head_dim: int
    sender_heads: int  # local KV heads in the sender's pool rows
    send_start: int  # first sent head inside a sender row
    send_heads: int  # heads each writer sends
    receiver_heads: int  # local KV heads in the receiver's pool rows
    scatter_starts: tuple[int, ...]  # head offset in a receiver row, one per writer
    dtype: torch.dtype = torch.bfloat16


SHAPES: dict[str, Shape] = {
    # Llama-3-70B: 8 KV heads, TP1 prefill -> TP4 decode: rank 1 gets heads 2-3.
    "llama70b-tp1-tp4": Shape("llama70b-tp1-tp4", 80, 128, 8, 2, 2, 2, (0,)),
    # Qwen-32B: 8 KV heads, TP4 prefill -> TP1 decode: 4 writers of 2 heads into one 8-head row.
    "qwen32b-tp4-tp1": Shape("qwen32b-tp4-tp1", 64, 128, 2, 0, 2, 8, (0, 2, 4, 6)),
    # Llama-3-8B: 8 KV heads, TP1 prefill -> TP8 decode: one head per receiver.
    "llama8b-tp1-tp8": Shape("llama8b-tp1-tp8", 32, 128, 8, 5, 1, 1, (0,)),
}


@dataclass
class Row:
    shape: str
    page_size: int
    tokens: int
    op: str
    bytes: int
    kernel_us: float
    copy_us: float
    kernel_gbps: float
    copy_gbps: float
    ratio: float
    exact: bool
    config: str


def _random_bits(shape: Sequence[int], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    width = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    raw = torch.randint(0, 256, (numel * width,), dtype=torch.uint8, generator=gen, device=device)
    return raw.view(dtype).view(*shape)


def _token_indices(tokens: int, page_size: int, pool_tokens: int, device: str,
                   gen: torch.Generator) -> torch.Tensor:
    """Pool rows of a request: random pages, expanded to tokens, last page cut to length."""
    pages = -(-tokens // page_size)
    page_idx = torch.randperm(pool_tokens // page_size, generator=gen, device=device)[:pages]
    rows = (page_idx[:, None] * page_size + torch.arange(page_size, device=device)[None, :]).reshape(-1)
    return rows[:tokens].contiguous()


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))


TIMER = "flush"  # set by --timer


def _time_us(fn: Callable[[], None]) -> float:
    """Median microseconds of one call. 'flush': each call after an L2 flush, timed with events
    (host launch cost partly included). 'graph': calls replayed from a CUDA graph, warm L2:
    device time only (what "kernel bandwidth" means), for the kernel and the copy alike."""
    import triton.testing

    if TIMER == "graph":
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
        except Exception as exc:  # capture refused: fall back, and say so
            print(f"bench_kernels: CUDA graph timing failed ({exc}); timing with flushes", file=sys.stderr)
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def run_case(shape: Shape, tokens: int, page_size: int, device: str, timed: bool,
             configs: Sequence[Any] | None = None) -> list[Row]:
    """Gather, scatter (and the all-writers scatter) of one chunk: time them and check them."""
    import kvd_kernels as kk
    from kvd_kernels import triton_kernels as tk

    gen = torch.Generator(device=device)
    gen.manual_seed(tokens * 7 + page_size)
    pool_tokens = max(2 * tokens, 64 * page_size)
    pool_tokens -= pool_tokens % page_size
    num_buffers = 2 * shape.num_layers
    # Separate allocations per buffer, as pools opened from CUDA IPC handles are.
    sender_bufs = [_random_bits((pool_tokens, shape.sender_heads, shape.head_dim), shape.dtype, device, gen)
                   for _ in range(num_buffers)]
    receiver_bufs = [_random_bits((pool_tokens, shape.receiver_heads, shape.head_dim), shape.dtype, device,
                                  gen) for _ in range(num_buffers)]
    # Wrapped once, as the daemon does at registration: launches skip the per-buffer checks.
    sender, receiver = kk.PoolBuffers(sender_bufs), kk.PoolBuffers(receiver_bufs)
    send_idx = _token_indices(tokens, page_size, pool_tokens, device, gen)
    recv_idx = _token_indices(tokens, page_size, pool_tokens, device, gen)
    itemsize = torch.empty((), dtype=shape.dtype).element_size()
    block = kk.staging_block_bytes(num_buffers, tokens, shape.send_heads, shape.head_dim, itemsize)
    writers = len(shape.scatter_starts)
    staging = torch.empty(block * writers, dtype=torch.uint8, device=device)
    expect = torch.empty(block, dtype=torch.uint8, device=device)
    rows: list[Row] = []

    def record(op: str, nbytes: int, fn: Callable[[Any], None], check: Callable[[], bool]) -> None:
        best_us, best_cfg = float("nan"), "default"
        copy_us = float("nan")
        if timed:
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_us = _time_us(lambda: dst.copy_(src))
            del src, dst
            for cfg in configs or [None]:
                us = _time_us(lambda cfg=cfg: fn(cfg))
                if not best_us <= us:
                    best_us, best_cfg = us, "default" if cfg is None else f"{cfg.block_tokens}x{cfg.num_warps}w"
        fn(None)
        exact = check()
        rows.append(Row(shape.name, page_size, tokens, op, nbytes, best_us, copy_us,
                        nbytes / best_us / 1e3, nbytes / copy_us / 1e3, copy_us / best_us, exact, best_cfg))

    def gather(cfg: Any) -> None:
        tk.gather_triton(sender, send_idx, shape.send_start, shape.send_heads, staging[:block], config=cfg)

    def check_gather() -> bool:
        kk.gather_reference(sender, send_idx, shape.send_start, shape.send_heads, expect)
        return torch.equal(staging[:block], expect)

    record("gather", block, gather, check_gather)
    for w in range(writers):  # every writer block holds real data for the scatter checks
        staging[w * block:(w + 1) * block].copy_(torch.roll(expect, w * 4096))
    before = [b.clone() for b in receiver_bufs]

    def scatter(cfg: Any) -> None:
        tk.scatter_triton(staging[:block], receiver, recv_idx, shape.scatter_starts[-1], shape.send_heads,
                          config=cfg)

    def check_scatter() -> bool:
        want = [b.clone() for b in before]
        kk.scatter_reference(staging[:block], want, recv_idx, shape.scatter_starts[-1], shape.send_heads)
        return _same(receiver_bufs, want)

    record("scatter", block, scatter, check_scatter)
    if writers > 1:
        for dst, src in zip(receiver_bufs, before, strict=True):
            dst.copy_(src)

        def scatter_all(cfg: Any) -> None:
            tk.scatter_writers_triton(staging, receiver, recv_idx, shape.scatter_starts, shape.send_heads,
                                      config=cfg)

        def check_all() -> bool:
            want = [b.clone() for b in before]
            kk.scatter_writers(staging, want, recv_idx, shape.scatter_starts, shape.send_heads,
                               use_triton=False)
            return _same(receiver_bufs, want)

        record(f"scatter{writers}w", block * writers, scatter_all, check_all)
    return rows


def tiny(shape: Shape) -> Shape:
    """The same head geometry with 2 layers and head_dim 16, for interpreter checks."""
    return Shape(shape.name + "-tiny", 2, 16, shape.sender_heads, shape.send_start, shape.send_heads,
                 shape.receiver_heads, shape.scatter_starts, shape.dtype)


def _print_table(rows: Sequence[Row]) -> None:
    head = (f"{'shape':<20} {'page':>4} {'tokens':>6} {'op':<10} {'MiB':>9} {'kern us':>9} "
            f"{'copy us':>9} {'kern GB/s':>9} {'copy GB/s':>9} {'ratio':>6} {'exact':>5} config")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.shape:<20} {r.page_size:>4} {r.tokens:>6} {r.op:<10} {r.bytes / 2**20:>9.2f} "
              f"{r.kernel_us:>9.1f} {r.copy_us:>9.1f} {r.kernel_gbps:>9.0f} {r.copy_gbps:>9.0f} "
              f"{r.ratio:>6.3f} {'yes' if r.exact else 'NO':>5} {r.config}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024,4096,16384", help="comma-separated chunk sizes")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--page-sizes", default="1,64", help="comma-separated page sizes")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON to OUT")
    parser.add_argument("--check-only", action="store_true",
                        help="correctness only, tiny shapes (CPU: Triton interpreter)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time a grid of tile configs and report the fastest")
    parser.add_argument("--timer", choices=("flush", "graph"), default="flush",
                        help="'flush': L2 flushed before each timed call; 'graph': CUDA-graph replay "
                             "(device time only, no launch cost)")
    args = parser.parse_args(argv)
    global TIMER
    TIMER = args.timer
    names = [s for s in args.shapes.split(",") if s]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    page_sizes = [int(p) for p in args.page_sizes.split(",") if p]

    cuda = torch.cuda.is_available()
    if not cuda and not args.check_only:
        print("bench_kernels: no CUDA device here; nothing to measure (use --check-only for the "
              "CPU correctness run under the Triton interpreter).")
        return 0
    if not cuda:
        # Must be set before kvd_kernels.triton_kernels is imported (the jit decorator reads it).
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cuda" if cuda else "cpu"
    configs = None
    if args.sweep and not args.check_only:
        from kvd_kernels.triton_kernels import LaunchConfig

        configs = [None] + [LaunchConfig(bt, nw) for bt in (8, 16, 32, 64, 128) for nw in (4, 8)]

    rows: list[Row] = []
    for name in names:
        for page_size in page_sizes:
            for count in tokens:
                if args.check_only:
                    shape, count = tiny(SHAPES[name]), min(count, 40)
                else:
                    shape = SHAPES[name]
                rows.extend(run_case(shape, count, page_size, device, timed=not args.check_only,
                                     configs=configs))
                if cuda:
                    torch.cuda.empty_cache()
    if args.check_only:
        for r in rows:
            print(f"{r.shape:<26} page {r.page_size:>3} tokens {r.tokens:>5} {r.op:<10} "
                  f"{'exact' if r.exact else 'MISMATCH'}")
    else:
        print(f"device: {torch.cuda.get_device_name()}  timer {TIMER}  (ratio = copy time / kernel time, "
              "same bytes)")
        _print_table(rows)
        ratios = [r.ratio for r in rows]
        print(f"min ratio {min(ratios):.3f}, median {sorted(ratios)[len(ratios) // 2]:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu",
                       "rows": [asdict(r) for r in rows]}, fh, indent=1)
    bad = [r for r in rows if not r.exact]
    if bad:
        print(f"MISMATCH in {len(bad)} case(s): " + ", ".join(f"{r.shape}/{r.page_size}/{r.tokens}/{r.op}"
                                                         for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
