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


@pytest.mark.parametrize("launch", ["loop", "worker"])
def test_row_copies_launched_by_the_loop_or_a_worker_are_exact(launch):
    """Row copies between two pools of this process (the ``local`` path), batch after batch of
    one shape and then others: with ``launch="loop"`` the first batch of a shape compiles on a
    copy thread and the later ones launch on the loop; every byte lands where it must, and a
    sentinel row between the written rows stays."""
    import asyncio

    import numpy as np

    from kvd.core.rows import RowBatch, RowCopy
    from kvd.transfer.memcpy import MemcpyTransport
    from kvd.transfer.router import SameNodeTransport, _row_kernel_key

    rows, stride, nbuf = 4096, 1024, 4
    src = [torch.randint(0, 255, (rows, stride), dtype=torch.uint8, device="cuda") for _ in range(nbuf)]
    dst = [torch.full((rows, stride), 7, dtype=torch.uint8, device="cuda") for _ in range(nbuf)]
    t = SameNodeTransport(MemcpyTransport("gpu-local"), workers=2, launch=launch)
    for buf in (*src, *dst):
        t.register(buf.data_ptr(), buf.numel())
    bases = (np.array([b.data_ptr() for b in src], dtype=np.int64), np.array([b.data_ptr() for b in dst], dtype=np.int64))
    rng = np.random.default_rng(1)
    expect = [d.clone() for d in dst]

    async def main():
        for n, offset, run in [(512, 256, 256)] * 4 + [(1000, 0, 512)] * 3 + [(7, 768, 256)] * 2:
            dst_rows = rng.permutation(rows // 2)[:n].astype(np.int64) * 2  # even rows only: odd ones are sentinels
            src_rows = rng.integers(0, rows, n).astype(np.int64)
            part = RowCopy(bases[0], bases[1], src_rows, dst_rows, stride, stride, offset, offset, run)
            result = await t.write_rows(t.session_id, RowBatch((part,)))
            assert result.nbytes == n * run * nbuf
            for b in range(nbuf):
                expect[b][torch.as_tensor(dst_rows, device="cuda"), offset:offset + run] = \
                    src[b][torch.as_tensor(src_rows, device="cuda"), offset:offset + run]
            if launch == "loop":
                assert (0, *_row_kernel_key(part)) in t._compiled or (
                    torch.cuda.current_device(), *_row_kernel_key(part)) in t._compiled

    try:
        asyncio.run(main())
        torch.cuda.synchronize()
        for b in range(nbuf):
            assert torch.equal(dst[b], expect[b]), b
            assert bool((dst[b][1::2] == 7).all())  # no write outside the rows asked for
        (path,) = t.paths().values()
        assert path["path"] == "local" and path["batches"]["one_pass"] == 9 and not path["fallbacks"], path
    finally:
        t.close()
