"""Staging gather/scatter: reference vs a per-element loop, Triton (interpreter) vs reference, byte for byte.

The Triton cases run in a subprocess with TRITON_INTERPRET=1 set before anything imports
triton, so they work whatever this pytest process imported before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kvd_kernels as kk
import numpy as np
import pytest
import torch
from kvd_kernels.reference import PoolBuffers, int_view_dtype

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPES += [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d]


def random_bits(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs and all), so a float round trip would be caught."""
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (int(np.prod(shape)) * width,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(*shape)


def naive_gather(buffers: Sequence[torch.Tensor], idx: Sequence[int], head_start: int, num_heads: int) -> bytes:
    out = bytearray()
    for buf in buffers:
        arr = buf.view(int_view_dtype(buf.dtype)).numpy()
        for t in idx:
            for h in range(head_start, head_start + num_heads):
                for d in range(buf.shape[2]):
                    out += arr[t, h, d].tobytes()
    return bytes(out)


def naive_scatter(staging: bytes, buffers: Sequence[torch.Tensor], idx: Sequence[int], head_start: int,
                  num_heads: int) -> None:
    pos = 0
    for buf in buffers:
        arr = buf.view(int_view_dtype(buf.dtype)).numpy()  # shares memory with buf
        width = arr.itemsize
        for t in idx:
            for h in range(head_start, head_start + num_heads):
                for d in range(buf.shape[2]):
                    arr[t, h, d] = np.frombuffer(staging[pos:pos + width], dtype=arr.dtype)[0]
                    pos += width
    assert pos == len(staging)


def as_bytes(buffers: Sequence[torch.Tensor]) -> list[bytes]:
    return [b.view(int_view_dtype(b.dtype)).numpy().tobytes() for b in buffers]


# --- reference ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_gather_matches_per_element_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    buffers = [random_bits((12, 4, 3), dtype, gen) for _ in range(4)]
    idx = [7, 2, 11, 2, 0]
    itemsize = buffers[0].element_size()
    out = torch.zeros(kk.staging_block_bytes(4, 5, 2, 3, itemsize), dtype=torch.uint8)
    kk.gather(buffers, torch.tensor(idx), 1, 2, out)
    assert out.numpy().tobytes() == naive_gather(buffers, idx, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_scatter_matches_per_element_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    buffers = [random_bits((10, 5, 4), dtype, gen) for _ in range(4)]
    expect = [b.clone() for b in buffers]
    idx = [9, 0, 4]
    itemsize = buffers[0].element_size()
    staging = random_bits((kk.staging_block_bytes(4, 3, 2, 4, itemsize),), torch.uint8, gen)
    kk.scatter(staging, buffers, torch.tensor(idx, dtype=torch.int32), 3, 2)
    naive_scatter(staging.numpy().tobytes(), expect, idx, 3, 2)
    assert as_bytes(buffers) == as_bytes(expect)


def test_reference_scatter_writers_and_round_trip_into_other_heads() -> None:
    gen = torch.Generator().manual_seed(3)
    sender = [random_bits((16, 2, 8), torch.bfloat16, gen) for _ in range(6)]
    receiver = [random_bits((20, 8, 8), torch.bfloat16, gen) for _ in range(6)]
    before = [b.clone() for b in receiver]
    send_idx, recv_idx = torch.tensor([3, 1, 15]), torch.tensor([19, 0, 7])
    block = kk.staging_block_bytes(6, 3, 2, 8, 2)
    region = torch.zeros(block * 4, dtype=torch.uint8)
    for w in range(4):  # four senders of 2 heads each (TP4 -> TP1)
        kk.gather(sender, send_idx, 0, 2, region[w * block:(w + 1) * block])
    kk.scatter_writers(region, receiver, recv_idx, [0, 2, 4, 6], 2)
    for got, old, src in zip(receiver, before, sender, strict=True):
        want = old.clone()
        for w in range(4):
            want[recv_idx, 2 * w:2 * w + 2] = src[send_idx]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_pool_buffers_validation_and_alignment() -> None:
    base = torch.zeros(4, 10, 6, 8, dtype=torch.bfloat16)
    pool = PoolBuffers(list(base[:, :, :4]))  # padded token stride: 6 heads' room, 4 used
    assert pool.row_stride == 48 and pool.local_heads == 4 and len(pool) == 4 and pool.align == 16
    assert PoolBuffers.of(pool) is pool and "4 x [10, 4, 8]" in repr(pool)
    with pytest.raises(ValueError, match="non-empty"):
        PoolBuffers([])
    with pytest.raises(ValueError, match="differs"):
        PoolBuffers([torch.zeros(10, 4, 8), torch.zeros(10, 4, 8, dtype=torch.float16)])
    with pytest.raises(ValueError, match="dense heads"):
        PoolBuffers([torch.zeros(10, 8, 4).transpose(1, 2)])
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\]"):
        PoolBuffers([torch.zeros(10, 8)])
    odd = torch.zeros(10 * 4 * 8 + 1, dtype=torch.uint8)[1:].view(10, 4, 8)
    assert PoolBuffers([odd]).align == 1


def test_call_validation() -> None:
    buffers = [torch.zeros(10, 4, 8, dtype=torch.float16) for _ in range(2)]
    idx = torch.tensor([1, 2])
    good = torch.zeros(kk.staging_block_bytes(2, 2, 2, 8, 2), dtype=torch.uint8)
    kk.gather(buffers, idx, 2, 2, good)
    for head_start, num_heads in ((3, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="heads"):
            kk.gather(buffers, idx, head_start, num_heads, good)
    with pytest.raises(ValueError, match="staging"):
        kk.gather(buffers, idx, 0, 2, good[:-1])
    with pytest.raises(ValueError, match="staging"):
        kk.scatter(good.view(torch.int16), buffers, idx, 0, 2)
    with pytest.raises(ValueError, match="token_idx"):
        kk.gather(buffers, idx.float(), 0, 2, good)
    for bad in ([1, -1], [1, 10]):  # torch would wrap -1 silently: must be refused
        with pytest.raises(IndexError, match="outside the pool"):
            kk.gather(buffers, torch.tensor(bad), 0, 2, good)
        with pytest.raises(IndexError, match="outside the pool"):
            kk.scatter(good, buffers, torch.tensor(bad), 0, 2)
    with pytest.raises(ValueError, match="writer"):
        kk.scatter_writers(good, buffers, idx, [], 2)
    with pytest.raises(ValueError, match="writer"):
        kk.scatter_writers(good[:-1], buffers, idx, [0, 2], 1)
    empty = torch.zeros(0, dtype=torch.uint8)
    kk.gather(buffers, torch.tensor([], dtype=torch.int64), 0, 2, empty)  # nothing to do, no error


def test_staging_block_bytes() -> None:
    assert kk.staging_block_bytes(160, 4096, 2, 128, 2) == 160 * 4096 * 2 * 128 * 2
    assert kk.staging_block_bytes(4, 0, 2, 128, 2) == 0
    with pytest.raises(ValueError):
        kk.staging_block_bytes(4, -1, 2, 128, 2)


def test_launch_config_heuristic() -> None:
    from kvd_kernels.triton_kernels import launch_config

    big = launch_config(512, 16384, 160, sm_count=132)  # > 16 MiB: 4 KiB tiles, 4 warps, streaming stores
    assert big.block_tokens * 512 == 4096 and big.num_warps == 4 and big.stream and not big.fuse_writers
    small = launch_config(256, 256, 64, sm_count=132)  # 4 MiB: 32 tokens, slab-fastest, no hints (H100 sweep)
    assert small.block_tokens == 32 and small.slab_fastest and not small.stream and not small.evict
    fused = launch_config(512, 256, 2 * 48, writers=2)  # 12 MiB, 2 writers fused: 16 tokens x 2 writers
    assert fused.block_tokens == 16 and fused.fuse_writers
    tiny = launch_config(64, 3, 2)  # never more rows than the chunk has (rounded up)
    assert tiny.block_tokens == 4
    for run in (2, 24, 100, 768, 8192):
        cfg = launch_config(run, 1000, 10)
        assert cfg.block_tokens >= 1 and cfg.block_tokens & (cfg.block_tokens - 1) == 0


def test_triton_on_cpu_without_interpreter_is_refused() -> None:
    """Checked in a fresh process without TRITON_INTERPRET, whatever this one was started with."""
    script = textwrap.dedent('''
        import torch
        import kvd_kernels as kk
        from kvd_kernels import triton_kernels as tk
        assert not tk.is_interpreted()
        buffers = [torch.zeros(4, 2, 8, dtype=torch.float16)]
        out = torch.zeros(kk.staging_block_bytes(1, 2, 1, 8, 2), dtype=torch.uint8)
        try:
            kk.gather(buffers, torch.tensor([0, 1]), 0, 1, out, use_triton=True)
        except RuntimeError as exc:
            assert "TRITON_INTERPRET" in str(exc), exc
            print("refused")
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", proc.stderr[-2000:]


# --- Triton under the interpreter (subprocess) --------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent('''
    import json, os, sys, traceback
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    import kvd_kernels as kk
    from kvd_kernels import reference as ref
    from kvd_kernels import triton_kernels as tk

    assert tk.is_interpreted()
    results = {}
    gen = torch.Generator().manual_seed(0)
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            DTYPES[name] = getattr(torch, name)

    def bits(shape, dtype):
        width = torch.empty((), dtype=dtype).element_size()
        n = 1
        for s in shape:
            n *= s
        return torch.randint(0, 256, (n * width,), dtype=torch.uint8, generator=gen).view(dtype).view(*shape)

    def same(a, b):
        return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))

    def case(name):
        def run(fn):
            try:
                fn()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
        return run

    def check(buffers, idx, head_start, n, receiver, recv_head, recv_idx=None, config=None, stage_pad=0):
        """Triton gather == reference gather; Triton scatter == reference scatter, rest untouched."""
        recv_idx = idx if recv_idx is None else recv_idx
        block = kk.staging_block_bytes(len(buffers), idx.numel(), n, buffers[0].shape[2],
                                       buffers[0].element_size())
        backing = torch.full((block + stage_pad,), 0xA5, dtype=torch.uint8)
        got = backing[stage_pad:]
        want = torch.zeros(block, dtype=torch.uint8)
        tk.gather_triton(buffers, idx, head_start, n, got, config=config)
        ref.gather_reference(buffers, idx, head_start, n, want)
        assert torch.equal(got, want), "gather differs from the reference"
        expect = [b.clone() for b in receiver]
        ref.scatter_reference(want, expect, recv_idx, recv_head, n)
        tk.scatter_triton(got, receiver, recv_idx, recv_head, n, config=config)
        assert same(receiver, expect), "scatter differs from the reference"

    def pages(page_size, tokens, pool_tokens):
        order = torch.randperm(pool_tokens // page_size, generator=gen)[: -(-tokens // page_size)]
        rows = (order[:, None] * page_size + torch.arange(page_size)[None, :]).reshape(-1)
        return rows[:tokens].contiguous()

    for dname, dtype in DTYPES.items():
        @case(f"dtype-{dname}-page1-scattered")
        def _():
            bufs = [bits((40, 4, 8), dtype) for _ in range(6)]
            recv = [bits((50, 3, 8), dtype) for _ in range(6)]
            check(bufs, torch.randperm(40, generator=gen)[:13], 1, 2, recv, 1,
                  recv_idx=torch.randperm(50, generator=gen)[:13])

        @case(f"dtype-{dname}-page4-int32")
        def _():
            bufs = [bits((64, 2, 16), dtype) for _ in range(4)]
            recv = [bits((64, 8, 16), dtype) for _ in range(4)]
            idx = pages(4, 10, 64).to(torch.int32)
            check(bufs, idx, 0, 2, recv, 6, recv_idx=pages(4, 10, 64).to(torch.int32))

    @case("multi-tile-partial-last-tile")
    def _():
        bufs = [bits((30, 4, 8), torch.bfloat16) for _ in range(4)]
        recv = [bits((30, 4, 8), torch.bfloat16) for _ in range(4)]
        check(bufs, torch.randperm(30, generator=gen)[:13], 2, 2, recv, 0, config=tk.LaunchConfig(4, 4))

    @case("default-config-70-tokens")
    def _():
        bufs = [bits((100, 8, 16), torch.bfloat16) for _ in range(4)]
        recv = [bits((100, 2, 16), torch.bfloat16) for _ in range(4)]
        check(bufs, torch.randperm(100, generator=gen)[:70], 2, 2, recv, 0)

    @case("narrow-alignment-hd6-bf16")  # 12-byte heads: 4-byte units, no 16-byte vectors
    def _():
        bufs = [bits((20, 4, 6), torch.bfloat16) for _ in range(4)]
        recv = [bits((20, 4, 6), torch.bfloat16) for _ in range(4)]
        check(bufs, torch.tensor([3, 19, 0, 7]), 1, 2, recv, 2)

    @case("byte-alignment-fp8-hd3-three-heads")  # odd sizes: 1-byte units, non power-of-two run
    def _():
        dtype = DTYPES.get("float8_e4m3fn", torch.int8)
        bufs = [bits((20, 5, 3), dtype) for _ in range(4)]
        recv = [bits((20, 4, 3), dtype) for _ in range(4)]
        check(bufs, torch.tensor([3, 19, 0, 7, 8]), 1, 3, recv, 1)

    @case("fp32-hd5-three-heads-nonpow2-run")
    def _():
        bufs = [bits((20, 3, 5), torch.float32) for _ in range(2)]
        recv = [bits((20, 3, 5), torch.float32) for _ in range(2)]
        check(bufs, torch.tensor([1, 2, 3, 18]), 0, 3, recv, 0)

    @case("misaligned-staging")
    def _():
        bufs = [bits((20, 4, 8), torch.float16) for _ in range(4)]
        recv = [bits((20, 4, 8), torch.float16) for _ in range(4)]
        check(bufs, torch.tensor([5, 1, 9]), 1, 2, recv, 2, stage_pad=2)

    @case("padded-token-stride-and-one-base-tensor")
    def _():
        base = bits((6, 25, 5, 16), torch.bfloat16)
        bufs = list(base[:, :, :4])  # views of one allocation, rows padded to 5 heads
        rbase = bits((6, 25, 9, 16), torch.bfloat16)
        recv = list(rbase[:, :, 1:9])
        pad_before = rbase[:, :, 0].clone()
        check(bufs, torch.randperm(25, generator=gen)[:11], 1, 3, recv, 4)
        assert torch.equal(rbase[:, :, 0].view(torch.int16), pad_before.view(torch.int16)), "padding touched"

    @case("round-trip-into-other-heads-rest-untouched")
    def _():
        sender = [bits((40, 8, 16), torch.bfloat16) for _ in range(8)]
        receiver = [bits((32, 4, 16), torch.bfloat16) for _ in range(8)]
        before = [b.clone() for b in receiver]
        sidx, ridx = torch.randperm(40, generator=gen)[:9], torch.randperm(32, generator=gen)[:9]
        stage = torch.zeros(kk.staging_block_bytes(8, 9, 2, 16, 2), dtype=torch.uint8)
        kk.gather(sender, sidx, 2, 2, stage, use_triton=True)
        kk.scatter(stage, receiver, ridx, 1, 2, use_triton=True)
        for got, old, src in zip(receiver, before, sender, strict=True):
            want = old.clone()
            want[ridx, 1:3] = src[sidx, 2:4]
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))

    @case("scatter-writers-one-launch")
    def _():
        recv = [bits((24, 8, 16), torch.bfloat16) for _ in range(6)]
        expect = [b.clone() for b in recv]
        idx = torch.randperm(24, generator=gen)[:7]
        block = kk.staging_block_bytes(6, 7, 2, 16, 2)
        region = bits((4 * block,), torch.uint8)
        kk.scatter_writers(region, expect, idx, [0, 2, 4, 6], 2, use_triton=False)
        kk.scatter_writers(region, kk.PoolBuffers(recv), idx, [0, 2, 4, 6], 2, use_triton=True)
        assert same(recv, expect)

    @case("out-of-range-rows-masked-in-kernel")
    def _():
        tk.check_rows = lambda *args: None  # what a GPU launch sees: no host check
        try:
            recv = [bits((10, 4, 8), torch.float16) for _ in range(2)]
            before = [b.clone() for b in recv]
            idx = torch.tensor([-1, 10, 3, 2**40, 5])
            stage = bits((kk.staging_block_bytes(2, 5, 2, 8, 2),), torch.uint8)
            tk.scatter_triton(stage, recv, idx, 1, 2)
            per_row = 2 * 8 * 2
            for b, (got, old) in enumerate(zip(recv, before, strict=True)):
                want = old.clone()
                for t, row in ((2, 3), (4, 5)):
                    start = (b * 5 + t) * per_row
                    want[row, 1:3] = stage[start:start + per_row].view(torch.float16).view(2, 8)
                assert torch.equal(got.view(torch.int16), want.view(torch.int16))
            out = torch.full_like(stage, 0x5A)
            tk.gather_triton(recv, idx, 1, 2, out)
            for b in range(2):
                for t in range(5):
                    chunk = out[(b * 5 + t) * per_row:(b * 5 + t + 1) * per_row]
                    if t in (0, 1, 3):
                        assert bool((chunk == 0x5A).all()), "masked row was written"
        finally:
            tk.check_rows = ref.check_rows

    @case("empty-chunk-is-a-no-op")
    def _():
        bufs = [bits((4, 2, 8), torch.float16)]
        tk.gather_triton(bufs, torch.tensor([], dtype=torch.int64), 0, 1, torch.zeros(0, dtype=torch.uint8))

    print("RESULTS " + json.dumps(results))
''')


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    script = tmp_path_factory.mktemp("interp") / "interp_cases.py"
    script.write_text(INTERPRETER_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS "):])


INTERPRETER_CASES = [
    *(f"dtype-{d}-{p}" for d in ("bf16", "fp16", "fp32") for p in ("page1-scattered", "page4-int32")),
    "multi-tile-partial-last-tile", "default-config-70-tokens", "narrow-alignment-hd6-bf16",
    "byte-alignment-fp8-hd3-three-heads", "fp32-hd5-three-heads-nonpow2-run", "misaligned-staging",
    "padded-token-stride-and-one-base-tensor", "round-trip-into-other-heads-rest-untouched",
    "scatter-writers-one-launch", "out-of-range-rows-masked-in-kernel", "empty-chunk-is-a-no-op",
]
if hasattr(torch, "float8_e4m3fn"):
    INTERPRETER_CASES += [f"dtype-float8_e4m3fn-{p}" for p in ("page1-scattered", "page4-int32")]
if hasattr(torch, "float8_e5m2"):
    INTERPRETER_CASES += [f"dtype-float8_e5m2-{p}" for p in ("page1-scattered", "page4-int32")]


@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_triton_interpreter_matches_reference(interpreter_results: dict[str, Any], name: str) -> None:
    assert name in interpreter_results, f"case {name} did not run"
    assert interpreter_results[name] == "ok", interpreter_results[name]


def test_every_interpreter_case_is_checked(interpreter_results: dict[str, Any]) -> None:
    assert sorted(interpreter_results) == sorted(INTERPRETER_CASES)


# --- the benchmark's CPU path ----------------------------------------------------------
def test_bench_check_only_runs_on_cpu() -> None:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--check-only", "--tokens", "9",
                           "--shapes", "qwen32b-tp4-tp1", "--page-sizes", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scatter4w  exact" in proc.stdout and "MISMATCH" not in proc.stdout
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "tools/bench_kernels.py"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "no CUDA" in proc.stdout


def test_reference_contiguous_rows_take_the_slice_path_and_match_indexing() -> None:
    """A run of ascending rows is copied as a slice; the bytes are what indexing gives."""
    from kvd_kernels import gather_reference, scatter_reference

    gen = torch.Generator().manual_seed(5)
    bufs = [torch.randint(-32768, 32767, (40, 4, 8), dtype=torch.int16, generator=gen).view(torch.bfloat16)
            for _ in range(3)]
    run = torch.arange(7, 19)
    spread = torch.tensor([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19])  # not one run
    for idx in (run, spread):
        out = torch.empty(3 * len(idx) * 2 * 8 * 2, dtype=torch.uint8)
        gather_reference(bufs, idx, 1, 2, out)
        want = torch.cat([b.view(torch.int16)[idx, 1:3].reshape(-1) for b in bufs]).view(torch.uint8)
        assert torch.equal(out, want)
        dst = [torch.zeros_like(b) for b in bufs]
        scatter_reference(out, dst, idx, 2, 2)
        for b, d in zip(bufs, dst, strict=True):
            assert torch.equal(d.view(torch.int16)[idx, 2:4], b.view(torch.int16)[idx, 1:3])
            assert not d.view(torch.int16)[:, :2].any()


@pytest.mark.parametrize("runs", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ungathered_block_ops_write_what_the_gather_writes(runs: int, dtype: torch.dtype) -> None:
    """The staged sender's no-gather path (a whole-row writer, chunk tokens in a few runs) must put
    exactly the gather kernel's bytes in the block: the ops are applied to the pool's real bytes
    here and compared with the reference gather of the same tokens."""
    from kvd.core.staging import ungathered_block_ops

    gen = torch.Generator().manual_seed(runs)
    tokens_in_pool, heads, head_dim, nbuf = 64, 2, 8, 6
    buffers = [random_bits((tokens_in_pool, heads, head_dim), dtype, gen) for _ in range(nbuf)]
    starts = sorted(torch.randperm(tokens_in_pool // 8, generator=gen)[:runs].tolist())
    order = np.random.default_rng(runs).permutation(len(starts))  # runs out of pool order too
    idx = np.concatenate([np.arange(starts[o] * 8, starts[o] * 8 + 3 + int(o)) for o in order])
    row = heads * head_dim * buffers[0].element_size()
    out = torch.zeros(nbuf * len(idx) * row, dtype=torch.uint8)
    kk.gather(buffers, torch.from_numpy(idx), 0, heads, out)
    bases = [b.data_ptr() for b in buffers]
    ops = ungathered_block_ops(idx, bases, row, 0)
    assert ops is not None and len(ops[0]) == nbuf * runs
    block = bytearray(out.numel())
    raw = {b.data_ptr(): b.view(torch.uint8).reshape(-1).numpy().tobytes() for b in buffers}
    for src, dst, n in zip(*ops, strict=True):
        base = max(a for a in bases if a <= src)
        block[dst:dst + n] = raw[base][src - base:src - base + n]
    assert bytes(block) == out.numpy().tobytes()
    assert ungathered_block_ops(np.arange(0, 2 * (runs + 1), 2), bases, row, 0, max_runs=runs) is None
