"""tools/gpu_sglang.py on a GPU: SGLang's classes over CUDA pools made the way SGLang makes them,
two real kvd daemons, every byte of KV and aux checked. Skipped cleanly without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [["--prefill-tp", "2", "--decode-tp", "1"],
                                   ["--prefill-tp", "1", "--decode-tp", "2", "--same-node", "off"],
                                   ["--mla", "--head-dim", "576", "--prefill-tp", "2", "--decode-tp", "1"]],
                         ids=["gqa-2to1-cudaipc", "gqa-1to2-tcp", "mla-2to1"])
def test_sglang_classes_over_cuda_pools(extra):
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_sglang.py"), "--rooms", "2", "--pages-per-room", "8",
           "--chunk-pages", "3", "--layers", "2", "--timeout", "60", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "byte-exact: True" in out and "aux rows exact: True" in out, out
