"""Raw Mooncake bulk write of N bytes over the same transport kvd uses: the yardstick.

``measure_raw_write(nbytes)`` starts a receiver process that registers an N-byte buffer,
registers an N-byte source here, writes it in a few large ops (no kvd in between) and
returns the seconds of the best of ``repeats`` runs. Benchmarks divide kvd's throughput
by this figure, measured in the same run.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import time

from kvd.memory import _address_of  # noqa: PLC2701 - one definition of "address of a mapping"
from kvd.transport import MooncakeTransport

_RECEIVER = r"""
import mmap, sys, time
from kvd.memory import _address_of
from kvd.transport import MooncakeTransport
n = int(sys.argv[1])
t = MooncakeTransport("127.0.0.1", sys.argv[2])
buf = mmap.mmap(-1, n)
addr = _address_of(buf)
t.register(addr, n)
print(t.session_id, addr, flush=True)
sys.stdin.readline()
"""


def measure_raw_write(nbytes: int, protocol: str = "tcp", op_bytes: int = 64 << 20,
                      repeats: int = 3) -> float:
    """Seconds to write ``nbytes`` from one registered buffer into a peer's (best of repeats)."""
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(nbytes), protocol],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        session, raddr = proc.stdout.readline().split()
        transport = MooncakeTransport("127.0.0.1", protocol)
        src = mmap.mmap(-1, nbytes)
        src[: min(nbytes, 1 << 20)] = bytes(range(256)) * (min(nbytes, 1 << 20) // 256)
        saddr = _address_of(src)
        transport.register(saddr, nbytes)
        offsets = list(range(0, nbytes, op_bytes))
        lengths = [min(op_bytes, nbytes - o) for o in offsets]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            transport.write_blocking(session, [saddr + o for o in offsets],
                                     [int(raddr) + o for o in offsets], lengths)
            best = min(best, time.perf_counter() - t0)
        transport.close()
        return best
    finally:
        if proc.stdin:
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(10)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256 << 20
    s = measure_raw_write(n)
    print(f"raw mooncake write: {n / 2**20:.0f} MiB in {s * 1e3:.1f} ms = {n / s / 1e9:.2f} GB/s")
