"""The batched copy kernel of the same-node path (GPU only; skipped cleanly without CUDA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.mark.parametrize("align", [16, 4, 2, 1])
def test_copy_ops_moves_exactly_the_ops(align):
    import numpy as np
    from kvd_kernels.copy_kernels import copy_ops_triton

    gen = np.random.default_rng(align)
    src = torch.randint(0, 256, (1 << 22,), dtype=torch.uint8, device="cuda")
    n = 3000
    lens = gen.integers(1, 40000 // align, n) * align
    lens[:3] = [1 << 20, 0, align]  # a large op, an empty one, a tiny one
    s_off = gen.integers(0, (src.numel() - lens.max()) // align, n) * align
    d_off = np.cumsum(np.concatenate([[0], lens[:-1]]))  # disjoint destinations
    dst = torch.zeros(int(d_off[-1] + lens[-1]), dtype=torch.uint8, device="cuda")
    copy_ops_triton(src.data_ptr() + s_off, dst.data_ptr() + d_off, lens, src.device)
    torch.cuda.synchronize()
    want = torch.zeros_like(dst)
    for so, do, ln in zip(s_off.tolist(), d_off.tolist(), lens.tolist(), strict=True):
        want[do:do + ln] = src[so:so + ln]
    assert torch.equal(dst, want)
