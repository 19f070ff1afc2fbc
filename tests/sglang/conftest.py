"""SGLang backend tests: SGLang's real classes (installed by tools/setup.sh from
tools/requirements-sglang.txt) against real kvd daemons."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchvision_stub  # noqa: E402

torchvision_stub.install()
pytest.importorskip("sglang.srt.disaggregation.base.conn",
                    reason="SGLang is not installed (bash tools/setup.sh installs it)")
