"""kvd's staging kernels against SGLang 0.5.23's released ones and a D2D copy, same buffers, one process.

48 cases: Llama-70B TP1->4, Qwen-32B TP4->1 (4 writers), Llama-8B TP1->8 (256-byte runs),
Qwen3-30B TP2->1 (2 writers); pages 1/16/64; 256, 1k, 4k, 16k tokens. For each case it
gathers one writer's head slice and scatters the whole chunk region (every writer) with
both projects' kernels into the same buffers, checks that both are byte-identical to the
torch reference, and times each with CUDA-graph replay (device time, warm L2, rotating
nothing: the same for all three) next to ``copy_`` of the same bytes.

SGLang is not part of this repository: ``--sglang`` names its ``staging_buffer.py`` (from
the released wheel: ``sglang/srt/disaggregation/common/staging_buffer.py``); its three
helper imports are stubbed here, nothing else of SGLang is imported.

    python3 tools/bench_gpu_kernels.py --sglang .gpu/sglsrc/sglang/srt/disaggregation/common/staging_buffer.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    kv_heads: int  # total
    prefill_tp: int
    decode_tp: int
    head_dim: int = 128


CASES = {
    "llama70b-tp1-tp4": Case("llama70b-tp1-tp4", 80, 8, 1, 4),
    "qwen32b-tp4-tp1": Case("qwen32b-tp4-tp1", 64, 8, 4, 1),
    "llama8b-tp1-tp8": Case("llama8b-tp1-tp8", 32, 8, 1, 8),
    "qwen3-30b-tp2-tp1": Case("qwen3-30b-tp2-tp1", 48, 4, 2, 1),
}


def load_sglang(path: str) -> types.ModuleType:
    """Import SGLang's staging_buffer.py alone, its helper imports stubbed."""
    import contextlib

    import torch

    def make_ptr_table(ptrs: Sequence[int], device: Any = None) -> torch.Tensor:
        return torch.tensor(list(ptrs), dtype=torch.int64, device=device)

    class _Flag:
        def get(self) -> bool:
            return False

    stubs = {
        "sglang": {}, "sglang.kernels": {}, "sglang.kernels.ops": {}, "sglang.kernels.ops.memory": {},
        "sglang.kernels.ops.memory.ptr_table": {"make_ptr_table": make_ptr_table},
        "sglang.srt": {}, "sglang.srt.environ": {"envs": types.SimpleNamespace(SGLANG_STAGING_USE_TORCH=_Flag())},
        "sglang.srt.utils": {"create_device_stream": lambda device: torch.cuda.Stream(device),
                             "device_stream_context": lambda s: torch.cuda.stream(s)
                             if s is not None else contextlib.nullcontext()},
    }
    for name, attrs in stubs.items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = []  # type: ignore[attr-defined]
            sys.modules[name] = mod
        for k, v in attrs.items():
            setattr(sys.modules[name], k, v)
    spec = importlib.util.spec_from_file_location("sglang_staging_buffer", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Row:
    case: str
    page: int
    tokens: int
    op: str
    bytes: int
    copy_us: float
    kvd_us: float
    sgl_us: float
    kvd_vs_sgl: float  # sglang time / kvd time (>1: kvd faster)
    kvd_vs_copy: float  # copy time / kvd time
    exact: bool
    config: str
    sweep: dict[str, float] | None = None


def _name(cfg: Any) -> str:
    return (f"{cfg.block_tokens}x{cfg.num_warps}w" + ("s" if cfg.stream else "") + ("o" if cfg.slab_fastest else "")
            + ("" if cfg.fuse_writers else "u") + ("" if cfg.evict else "n"))


def _config(text: str) -> Any:
    """'8x4' = 8 tokens x 4 warps; letters after: s streaming stores, o slab-fastest order, u unfused,
    n no evict-first hint on loads."""
    from kvd_kernels.triton_kernels import LaunchConfig

    b, rest = text.split("x")
    w = "".join(ch for ch in rest if ch.isdigit())
    flags = rest[len(w):]
    return LaunchConfig(int(b), int(w), "s" in flags, "o" in flags, "u" not in flags, "n" not in flags)


def _interleaved(fns: Sequence[Callable[[], None] | None], rep: int, rounds: int = 3) -> list[float]:
    """Median over ``rounds`` of each function's time, taken in turns (A B C A B C ...): clock or
    thermal drift during a case then favours none of them."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            runs[i].append(_time_us(fn, rep) if fn is not None else float("nan"))
    return [sorted(r)[len(r) // 2] for r in runs]


def _time_us(fn: Callable[[], None], rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def run_case(case: Case, page: int, tokens: int, sgl: types.ModuleType | None, rep: int,
             configs: Sequence[Any]) -> list[Row]:
    import kvd_kernels as kk
    import torch
    from kvd_kernels import triton_kernels as tk

    dev = "cuda"
    gen = torch.Generator(device=dev)
    gen.manual_seed(tokens * 131 + page)
    s_heads = case.kv_heads // case.prefill_tp
    r_heads = case.kv_heads // case.decode_tp
    n = min(s_heads, r_heads)  # heads per writer
    writers = max(1, case.prefill_tp // case.decode_tp)
    # sender rank 0 (TP1 -> TPn: the last decode rank's heads), receiver rank 0
    send_start = 0 if case.prefill_tp >= case.decode_tp else (case.decode_tp - 1) * n % s_heads
    starts = [w * n for w in range(writers)] if writers > 1 else [0]
    pool_tokens = max(4 * tokens, 256 * page)
    pool_tokens -= pool_tokens % page
    nb = 2 * case.layers

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        return torch.randint(-32768, 32767, (numel,), dtype=torch.int16, device=dev,
                             generator=gen).view(torch.bfloat16).view(*shape)

    sbufs = [rand((pool_tokens, s_heads, case.head_dim)) for _ in range(nb)]
    rbufs = [rand((pool_tokens, r_heads, case.head_dim)) for _ in range(nb)]
    spool, rpool = kk.PoolBuffers(sbufs), kk.PoolBuffers(rbufs)
    npages = tokens // page
    spages = torch.randperm(pool_tokens // page, generator=gen, device=dev)[:npages]
    rpages = torch.randperm(pool_tokens // page, generator=gen, device=dev)[:npages]
    ar = torch.arange(page, device=dev)
    sidx = (spages[:, None] * page + ar).reshape(-1).contiguous()
    ridx = (rpages[:, None] * page + ar).reshape(-1).contiguous()
    block = kk.staging_block_bytes(nb, tokens, n, case.head_dim, 2)
    st_kvd = torch.empty(block, dtype=torch.uint8, device=dev)
    st_sgl = torch.empty(block, dtype=torch.uint8, device=dev)
    want = torch.empty(block, dtype=torch.uint8, device=dev)
    rows: list[Row] = []
    src = torch.empty(block * writers, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)

    # --- gather ---
    sgl_g = None
    if sgl is not None:
        ptrs = sgl.make_ptr_table([b.data_ptr() for b in sbufs], device=dev)
        per_layer = tokens * n * case.head_dim
        st16 = st_sgl.view(torch.int16)

        def sgl_g() -> None:
            sgl._fused_gather_to_staging_kernel[(nb, -(-per_layer // 1024))](
                ptrs, spages, st16, tokens, s_heads * case.head_dim, send_start * case.head_dim,
                per_layer, n * case.head_dim, page, 1024)

    def kvd_g(cfg: Any = None) -> None:
        tk.gather_triton(spool, sidx, send_start, n, st_kvd, config=cfg)

    kk.gather_reference(spool, sidx, send_start, n, want)
    st_kvd.zero_()
    kvd_g()
    exact = torch.equal(st_kvd, want)
    if sgl_g is not None:
        st_sgl.zero_()
        sgl_g()
        exact = exact and torch.equal(st_sgl, want)
    copy_us, best, sgl_us = _interleaved([lambda: dst[:block].copy_(src[:block]), kvd_g, sgl_g], rep)
    best_cfg = "default"
    sweep = {"default": best}
    for cfg in configs:
        us = sweep[_name(cfg)] = _time_us(lambda cfg=cfg: kvd_g(cfg), rep)
        if us < best:
            best, best_cfg = us, _name(cfg)
    rows.append(Row(case.name, page, tokens, "gather", block, copy_us, best, sgl_us, sgl_us / best,
                    copy_us / best, exact, best_cfg, sweep if configs else None))

    # --- scatter of the whole region (all writers) ---
    region = torch.randint(0, 256, (block * writers,), dtype=torch.uint8, device=dev, generator=gen)
    before = [b.clone() for b in rbufs]
    expect = [b.clone() for b in rbufs]
    kk.scatter_writers(region, expect, ridx, starts, n, use_triton=False)

    def kvd_s(cfg: Any = None) -> None:
        tk.scatter_writers_triton(region, rpool, ridx, starts, n, config=cfg)

    kvd_s()
    exact = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(rbufs, expect, strict=True))
    sgl_s = None
    if sgl is not None:
        rptrs = sgl.make_ptr_table([b.data_ptr() for b in rbufs], device=dev)
        offs = torch.tensor([s * case.head_dim for s in starts], dtype=torch.int64, device=dev)
        per_layer = tokens * n * case.head_dim
        reg16 = region.view(torch.int16)

        def sgl_s() -> None:
            sgl._fused_scatter_from_staging_kernel[(writers * nb, -(-per_layer // 1024))](
                rptrs, rpages, reg16, offs, tokens, r_heads * case.head_dim, per_layer,
                n * case.head_dim, page, nb, 1024)

        for a, b in zip(rbufs, before, strict=True):
            a.copy_(b)
        sgl_s()
        exact = exact and all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                              for a, b in zip(rbufs, expect, strict=True))
    nbytes = block * writers
    copy_us, best, sgl_us = _interleaved([lambda: dst.copy_(src), kvd_s, sgl_s], rep)
    best_cfg = "default"
    sweep = {"default": best}
    for cfg in configs:
        us = sweep[_name(cfg)] = _time_us(lambda cfg=cfg: kvd_s(cfg), rep)
        if us < best:
            best, best_cfg = us, _name(cfg)
    rows.append(Row(case.name, page, tokens, f"scatter{writers}w", nbytes, copy_us, best, sgl_us,
                    sgl_us / best, copy_us / best, exact, best_cfg, sweep if configs else None))
    return rows


def print_rows(rows: Sequence[Row], header: bool = True) -> None:
    if header:
        print(f"{'case':<18} {'page':>4} {'tokens':>6} {'op':<9} {'MiB':>7} {'copy us':>8} {'kvd us':>8} "
              f"{'sgl us':>8} {'kvd/sgl':>7} {'kvd/copy':>8} exact config")
    for r in rows:
        print(f"{r.case:<18} {r.page:>4} {r.tokens:>6} {r.op:<9} {r.bytes / 2**20:>7.2f} {r.copy_us:>8.1f} "
              f"{r.kvd_us:>8.1f} {r.sgl_us:>8.1f} {r.kvd_vs_sgl:>7.3f} {r.kvd_vs_copy:>8.3f} "
              f"{'yes' if r.exact else 'NO':>5} {r.config}")


def summary(rows: Sequence[Row]) -> list[str]:
    out = []
    for op in ("gather", "scatter"):
        sel = [r for r in rows if r.op.startswith(op)]
        if not sel:
            continue
        vs = sorted(r.kvd_vs_sgl for r in sel)
        big = [r.kvd_vs_copy for r in sel if r.tokens >= 1024]
        slower = [r for r in sel if r.kvd_vs_sgl < 1.0]
        out.append(f"{op}: kvd/SGLang min {vs[0]:.3f} median {vs[len(vs) // 2]:.3f} over {len(sel)} cases, "
                   f"{len(slower)} slower; kvd/copy from 1k tokens min {min(big) if big else float('nan'):.3f}"
                   f", all tokens min {min(r.kvd_vs_copy for r in sel):.3f}")
    out.append(f"byte-exact: {sum(r.exact for r in rows)}/{len(rows)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang", default=str(ROOT / ".gpu/sglsrc/sglang/srt/disaggregation/common/staging_buffer.py"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--pages", default="1,16,64")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--rep", type=int, default=50, help="ms of graph replays per timing")
    ap.add_argument("--sweep", default="", help="tile configs to also try, e.g. '8x4,16x4,32x8'")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_kernels: no CUDA device here; nothing to measure.")
        return 0
    sgl = load_sglang(a.sglang) if a.sglang and Path(a.sglang).exists() else None
    if sgl is None:
        print(f"bench_gpu_kernels: SGLang's staging_buffer.py not found at {a.sglang}: kvd vs copy only")
    configs = [_config(c) for c in a.sweep.split(",") if c]
    rows: list[Row] = []
    print(f"device: {torch.cuda.get_device_name()}; CUDA-graph replay, median; ratios are times in this run")
    print_rows([])
    for name in a.cases.split(","):
        for page in (int(p) for p in a.pages.split(",")):
            for tokens in (int(t) for t in a.tokens.split(",")):
                new = run_case(CASES[name], page, tokens, sgl, a.rep, configs)
                print_rows(new, header=False)
                rows.extend(new)
                if a.json:  # written as it goes: a run cut short still leaves its rows
                    Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
                torch.cuda.empty_cache()
    for line in summary(rows):
        print(line)
    return 0 if all(r.exact for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
