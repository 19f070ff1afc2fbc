"""Loaded at start-up by the daemons of tests/e2e/test_slow_registration.py (through
PYTHONPATH): while the file named by ``SLOW_REGISTER_FLAG`` exists, every Mooncake memory
registration takes ``SLOW_REGISTER_S`` seconds, as a GPU pool's region does on the H100 host
(0.46 s each, cProfile of ``tools/gpu_e2e.py --profile``)."""

from __future__ import annotations

import os
import time

_flag = os.environ.get("SLOW_REGISTER_FLAG")
if _flag:
    from kvd.transfer import mooncake

    _register = mooncake.MooncakeTransport.register

    def _slow_register(self: mooncake.MooncakeTransport, addr: int, length: int) -> None:
        if _flag and os.path.exists(_flag):
            time.sleep(float(os.environ.get("SLOW_REGISTER_S", "2")))
        _register(self, addr, length)

    mooncake.MooncakeTransport.register = _slow_register  # type: ignore[method-assign]
