"""The one-pass row copy kernel (``copy_rows_triton``) against :meth:`RowCopy.ops` applied op by op.

On CPU it runs under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set
before triton is imported); on a GPU the same check runs on CUDA tensors. Every byte of the
destination buffers is compared, so a write outside the asked rows and heads (the sentinel
around them) fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent('''
    import ctypes, json, sys
    import numpy as np
    import torch
    from kvd.core.rows import RowCopy
    from kvd_kernels.copy_kernels import copy_rows_triton

    def one(device, buffers, rows, src_heads, dst_heads, src_off, dst_off, n, head_bytes, seed, page=1):
        gen = np.random.default_rng(seed)
        src_stride, dst_stride = src_heads * head_bytes, dst_heads * head_bytes
        pool_rows = (rows + 7) * page
        srcs = [torch.randint(0, 256, (pool_rows * src_stride,), dtype=torch.uint8, device=device)
                for _ in range(buffers)]
        dsts = [torch.full((pool_rows * dst_stride,), 0xA5, dtype=torch.uint8, device=device)
                for _ in range(buffers)]
        want = [d.clone().cpu() for d in dsts]
        s_rows = gen.choice(pool_rows // page, rows, replace=False).astype(np.int64)
        d_rows = gen.choice(pool_rows // page, rows, replace=False).astype(np.int64)
        rc = RowCopy(np.array([s.data_ptr() for s in srcs], np.int64), np.array([d.data_ptr() for d in dsts], np.int64),
                     s_rows, d_rows, src_stride, dst_stride, src_off * head_bytes, dst_off * head_bytes, n * head_bytes,
                     page)
        # the reference: every op the row copy stands for, on host copies
        host_src = [s.cpu() for s in srcs]
        ops = rc.ops()
        per_buffer = rows * page
        for b in range(buffers):
            for i in range(per_buffer):
                k = b * per_buffer + i
                so = int(ops.src[k]) - srcs[b].data_ptr()
                do = int(ops.dst[k]) - dsts[b].data_ptr()
                want[b][do:do + int(ops.length[k])] = host_src[b][so:so + int(ops.length[k])]
        copy_rows_triton(rc.src_bases.tolist(), rc.dst_bases.tolist(), rc.src_rows, rc.dst_rows, rc.src_stride,
                         rc.dst_stride, rc.src_offset, rc.dst_offset, rc.run, torch.device(device),
                         rows_per_index=rc.rows_per_index)
        if device == "cuda":
            torch.cuda.synchronize()
        return all(torch.equal(d.cpu(), w) for d, w in zip(dsts, want))

    device = sys.argv[1]
    cases = {
        "TP4->1 head slice, 256-byte heads": (4, 37, 2, 8, 0, 4, 2, 256),
        "TP1->4 one head, odd rows": (3, 19, 8, 2, 5, 1, 1, 256),
        "fp8-like 2-byte heads, unaligned offset": (2, 11, 6, 6, 1, 3, 2, 2),
        "one-byte heads": (2, 9, 5, 3, 2, 0, 3, 1),
        "wide 4 KiB runs": (2, 33, 16, 16, 0, 0, 16, 256),
        "pages of 4 rows, TP4->1": (3, 9, 2, 8, 0, 6, 2, 256, 4),
        "pages of 16 rows, odd run": (2, 5, 6, 3, 1, 1, 2, 6, 16),
    }
    if device == "cuda":  # large enough for the streaming tiles (> 16 MiB)
        cases["large: 64 buffers x 8192 rows, pages of 16"] = (64, 512, 2, 8, 0, 2, 2, 256, 16)
    results = {name: one(device, *args[:8], seed=i, page=args[8] if len(args) > 8 else 1)
               for i, (name, args) in enumerate(cases.items())}
    if device != "cuda":  # the large-batch launch (buffer-major, streaming) on the small cases
        import kvd_kernels.copy_kernels as copy_kernels
        copy_kernels.SMALL_CHUNK_BYTES = 0
        results.update({f"{name} (large-batch launch)": one(device, *args[:8], seed=i, page=args[8] if len(args) > 8 else 1)
                        for i, (name, args) in enumerate(cases.items())})
    print(json.dumps(results))
''')


def _run(device: str, env: dict[str, str]) -> dict[str, bool]:
    proc = subprocess.run([sys.executable, "-c", CHECK, device], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_copy_rows_interpreter_matches_ops() -> None:
    results = _run("cpu", {**os.environ, "TRITON_INTERPRET": "1"})
    assert results and all(results.values()), results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_copy_rows_cuda_matches_ops() -> None:
    results = _run("cuda", {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert results and all(results.values()), results
