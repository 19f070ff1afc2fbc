"""Two GPUs of one host only (skipped cleanly elsewhere): prefill engine ranks on GPU 0, decode
engine ranks on GPU 1, each side with its own daemon, the same-node CUDA IPC path carrying the
bytes GPU 0 -> GPU 1, every byte checked on the GPU (tools/gpu_two.py, small sizes)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.e2e, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs on one host (CI has none)")]


def _args():
    from tools.gpu_two import parser

    return parser().parse_args(["--layers", "4", "--tokens", "4096", "--warm-tokens", "1024", "--chunk-tokens",
                                "1024", "--staging-pool", "64MiB", "--staging-chunk-tokens", "512",
                                "--timeout", "60", "--peer-access", "off"])


@pytest.mark.parametrize("prefill_tp, decode_tp, kv_heads, path", [
    (1, 1, 8, "direct"),   # same TP: merged runs straight into the decode pool on the other GPU
    (4, 1, 8, "direct"),   # one pass: each head slice straight into the pool on the other GPU
    (1, 4, 2, "direct"),   # GQA: each decode rank holds a replica of one head
    (4, 1, 2, "direct"),   # GQA: replicated prefill ranks, dummies
    (4, 1, 8, "staged"),   # one pass off: gather on GPU 0, one write per chunk, scatter on GPU 1
])
def test_cross_gpu_same_node_byte_exact(prefill_tp, decode_tp, kv_heads, path):
    from tools.gpu_two import Case, run_case

    case = Case(f"{prefill_tp}->{decode_tp} kv {kv_heads}", prefill_tp, decode_tp, kv_heads,
                one_pass=path != "staged")
    r = run_case(_args(), case, 1, peer_access=False)
    assert r["ok"], (r.get("error"), r.get("failures"), r.get("prefill_log"), r.get("decode_log"))
    assert set(r["paths"]) == {path}
    assert r["bytes"] > 0
    lines, _totals = r["peer_paths"]  # the prefill daemon's peer_path / fallback events, per-peer totals
    assert any("cuda_ipc" in p for p in lines), lines
    assert not any("fallback" in p for p in lines), lines
