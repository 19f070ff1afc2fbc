"""Issue 14's figures in one run on a GPU machine, every one a ratio of times taken in this run.

1. same-node raw: a device-to-device copy (``copy_``), kvd's CUDA IPC path (SameNodeTransport,
   two processes), Mooncake's ``nvlink_intra`` and TCP transports (two processes), 1 GiB
   GPU -> GPU, plus 4 KiB ops per second;
2. end to end with two kvd daemons and fake engine ranks on this GPU (tools/gpu_e2e.py),
   128k-token contexts, byte-exact: same-node TP 1->1, 4->1, 1->4, 2->1 and GQA (2 kv heads,
   4->1) against the D2D copy of the same bytes; the network path (TCP here) staged/raw for
   4->1 and 2->1;
3. the kernels against SGLang 0.5.23's (tools/bench_gpu_kernels.py) unless ``--skip-kernels``.

    python3 tools/bench_gpu.py --sglang PATH/staging_buffer.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def d2d_gbps(nbytes: int, reps: int = 10) -> float:
    """Bytes copied per second by ``copy_`` between two device buffers (median of ``reps``)."""
    import torch

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def _transport(mode: str) -> Any:
    from kvd.transfer.mooncake import MooncakeTransport

    if mode == "cuda_ipc":
        from kvd.transfer.router import SameNodeTransport

        return SameNodeTransport(MooncakeTransport("127.0.0.1", "tcp", "", 4, 4, 1024), 2)
    return MooncakeTransport("127.0.0.1", mode, "", 4, 4, 1024)


def _receiver(mode: str, nbytes: int, q: Any, done: Any) -> None:
    import torch

    try:
        t = _transport(mode)
        dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t.register(dst.data_ptr(), nbytes)
        q.put((t.session_id, dst.data_ptr()))
    except Exception as exc:
        q.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    done.wait()
    q.put(bytes(dst[:: max(1, nbytes // 4096)].cpu().numpy().tobytes()))
    t.close()


def raw_one(mode: str, nbytes: int, reps: int = 5) -> dict[str, Any]:
    """GB/s of writing ``nbytes`` GPU -> GPU into another process with ``mode``, byte-checked;
    and 4 KiB ops per second (16,384 ops in one batch)."""
    import numpy as np
    import torch

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(mode, nbytes, q, done))
    proc.start()
    got = q.get(timeout=120)
    if got[0] == "error":
        proc.join(10)
        return {"mode": mode, "error": got[1]}
    session, dst = got
    out: dict[str, Any] = {"mode": mode}
    try:
        t = _transport(mode)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t.register(src.data_ptr(), nbytes)
        piece = 64 << 20
        offs = np.arange(0, nbytes, piece, dtype=np.int64)
        lens = np.minimum(piece, nbytes - offs)
        small = np.arange(16384, dtype=np.int64) * (nbytes // 16384)
        small_len = np.full(16384, 4096, dtype=np.int64)

        async def write(s: Any, d: Any, n: Any) -> float:
            t0 = time.perf_counter()
            if hasattr(t, "write_blocking"):
                t.write_blocking(session, s.tolist(), d.tolist(), n.tolist())
            else:
                await t.write(session, s, d, n)
            return time.perf_counter() - t0

        async def main() -> None:
            await write(src.data_ptr() + offs, dst + offs, lens)  # first write: path decided, handles opened
            best = min([await write(src.data_ptr() + offs, dst + offs, lens) for _ in range(reps)])
            out["gbps"] = nbytes / best / 1e9
            one = min([await write(np.array([src.data_ptr()]), np.array([dst]), np.array([nbytes]))
                       for _ in range(reps)])
            out["gbps_one_op"] = nbytes / one / 1e9
            ops = min([await write(src.data_ptr() + small, dst + small, small_len) for _ in range(3)])
            out["ops_per_s_4k"] = 16384 / ops
            await write(src.data_ptr() + offs, dst + offs, lens)  # last: the bytes checked below
            if hasattr(t, "paths"):
                out["paths"] = t.paths()

        asyncio.run(main())
        want = bytes(src[:: max(1, nbytes // 4096)].cpu().numpy().tobytes())
        done.set()
        out["exact_sampled"] = q.get(timeout=120) == want
        t.close()
    except Exception as exc:
        done.set()
        out["error"] = f"{type(exc).__name__}: {exc}"
    proc.join(30)
    return out


def raw_section(nbytes: int) -> list[str]:
    d2d = d2d_gbps(nbytes)
    lines = [f"raw same-node, {nbytes / 2**30:.2f} GiB GPU->GPU into another process; D2D copy_ {d2d:.0f} GB/s"]
    for mode in ("cuda_ipc", "nvlink_intra", "tcp"):
        # each in its own process: Mooncake reads its environment once per process
        r = subprocess.run([sys.executable, __file__, "--raw-one", mode, str(nbytes)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
        try:
            res = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"mode": mode, "error": (r.stdout + r.stderr)[-600:]}
        if "error" in res:
            lines.append(f"  {mode:<13} failed: {res['error']}")
            continue
        lines.append(f"  {mode:<13} {res['gbps']:8.1f} GB/s (64 MiB ops) = {res['gbps'] / d2d:.3f} of D2D; one op "
                     f"{res['gbps_one_op']:.1f} GB/s = {res['gbps_one_op'] / d2d:.3f}; 4 KiB ops "
                     f"{res['ops_per_s_4k']:,.0f}/s; sampled bytes exact {res['exact_sampled']}"
                     + (f"; paths {json.dumps(res['paths'])}" if res.get("paths") else ""))
    return lines


E2E = [  # name, prefill TP, decode TP, kv heads, same_node, staged
    ("same-node TP 1->1", 1, 1, 8, "cuda_ipc", True),
    ("same-node TP 1->1, one 128k chunk", 1, 1, 8, "cuda_ipc", True),
    ("same-node TP 4->1", 4, 1, 8, "cuda_ipc", True),
    ("same-node TP 1->4", 1, 4, 8, "cuda_ipc", True),
    ("same-node TP 2->1", 2, 1, 8, "cuda_ipc", True),
    ("same-node GQA 2 kv heads, TP 4->1", 4, 1, 2, "cuda_ipc", True),
    ("same-node GQA 2 kv heads, TP 1->4", 1, 4, 2, "cuda_ipc", True),
    ("same-node TP 4->1, staged (one pass off)", 4, 1, 8, "cuda_ipc", True),
    ("network (TCP) TP 4->1", 4, 1, 8, "off", True),
    ("network (TCP) TP 2->1", 2, 1, 8, "off", True),
]


def e2e_section(tokens: int, which: str, timeout: float = 240.0, repeat: int = 3) -> list[str]:
    from tools import gpu_e2e

    d2d = d2d_gbps(4 << 30)
    lines = [f"end to end, two kvd daemons on this GPU, 32 layers x hd 128 bf16, {tokens} tokens per room; "
             f"D2D copy_ {d2d:.0f} GB/s (4 GiB, this run)"]
    for name, ptp, dtp, heads, same, staged in E2E:
        if which and not any(w in name for w in which.split(",")):
            continue
        a = gpu_e2e.parser().parse_args(["--prefill-tp", str(ptp), "--decode-tp", str(dtp), "--kv-heads", str(heads),
                                         "--tokens", str(tokens), "--same-node", same, "--timeout", str(timeout),
                                         "--warmup-tokens", "8192", "--repeat", str(repeat)]
                                        + (["--chunk-tokens", "131072"] if "one 128k chunk" in name else [])
                                        + (["--daemon-flag=--no-transport-one-pass"] if "one pass off" in name else [])
                                        + ([] if staged else ["--no-staging"]))
        a.num_pages = a.rooms * a.tokens // a.page_size + 64
        try:
            r = gpu_e2e.run(a)
        except Exception as exc:
            lines.append(f"  {name}: failed: {type(exc).__name__}: {exc}"[:800])
            continue
        line = (f"  {name:<36} exact {r['ok']} {r['bytes'] / 2**30:6.2f} GiB {r['seconds']:7.3f} s "
                f"{r['gbps']:7.1f} GB/s paths {r['paths']} ops {r['write_ops']}")
        if same != "off":
            line += (f" -> transfer (KV ready -> engines told, {r['transfer_seconds'] * 1e3:.1f} ms) "
                     f"{r['transfer_gbps'] / d2d:.3f} of D2D; room with bootstrap {r['gbps'] / d2d:.3f}")
            sn = [p for p in r.get("path_totals", {}).values()]
            if sn:
                line += (f"; same-node batches {sum(p['batches']['same_node'] for p in sn)} (one pass "
                         f"{sum(p['batches'].get('one_pass', 0) for p in sn)}), network batches "
                         f"{sum(p['batches']['network'] for p in sn)}, fallbacks "
                         f"{sum(sum(p['fallbacks'].values()) for p in sn)} (warm-up room included)")
            if r["gather_s"] or r["scatter_s"]:
                line += f" (kernel busy: gather {r['gather_s']:.3f} s, scatter {r['scatter_s']:.3f} s)"
        else:
            raw = gpu_e2e.raw_gpu_write(min(r["bytes"], 4 << 30))
            line += f"; raw TCP GPU->GPU {raw:.2f} GB/s -> staged/raw {r['gbps'] / raw:.3f}"
        case = [line] + ["      " + p[:300] for p in r["peer_paths"][:3]]
        if r["failures"]:
            case.append(f"      failures: {r['failures']}"[:600])
        lines += case
        print("\n".join(case), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw-one", nargs=2, metavar=("MODE", "BYTES"), help=argparse.SUPPRESS)
    ap.add_argument("--raw-bytes", type=int, default=1 << 30)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--e2e", default="", help="comma-separated substrings of the end-to-end cases to run")
    ap.add_argument("--e2e-timeout", type=float, default=240.0, help="seconds each end-to-end case may take")
    ap.add_argument("--e2e-repeat", type=int, default=3, help="timed rounds per end-to-end case (the median is printed)")
    ap.add_argument("--kernel-rep", type=int, default=25, help="ms of graph replays per kernel timing")
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--sglang", default=str(ROOT / ".gpu/sglsrc/sglang/srt/disaggregation/common/staging_buffer.py"))
    a = ap.parse_args(argv)
    import torch

    if a.raw_one:
        mode, nbytes = a.raw_one[0], int(a.raw_one[1])
        if mode == "nvlink_intra":
            os.environ.setdefault("MC_INTRANODE_NVLINK", "1")
        print(json.dumps(raw_one(mode, nbytes)))
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    out: list[str] = []
    if not a.skip_raw:
        out += raw_section(a.raw_bytes)
        print("\n".join(out), flush=True)
    if not a.skip_e2e:
        out += e2e_section(a.tokens, a.e2e, a.e2e_timeout, a.e2e_repeat)
    print("\n=== summary (ratios within this run) ===")
    print("\n".join(out), flush=True)
    if not a.skip_kernels:
        from tools import bench_gpu_kernels

        return bench_gpu_kernels.main(["--sglang", a.sglang, "--rep", str(a.kernel_rep)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
