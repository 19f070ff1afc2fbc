"""SameNodeTransport between two processes on one GPU (skipped cleanly without CUDA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def test_two_processes_same_node_path_is_taken_and_exact():
    from tools.bench_gpu import raw_one

    r = raw_one("cuda_ipc", 64 << 20, reps=1)
    assert "error" not in r, r
    (path,) = r["paths"].values()
    assert path["path"] == "cuda_ipc", path
    assert path["batches"]["network"] == 0 and not path["fallbacks"], path
    assert r["exact_sampled"], r
