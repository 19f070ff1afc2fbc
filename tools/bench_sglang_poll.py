"""Poll cost of the kvd SGLang backend: one scheduler loop's poll of N rooms.

Starts one real kvd daemon, builds a decode KvdKVManager with SGLang's real KVArgs, opens N
receivers (rooms the daemon has not seen: the case SGLang polls most), and times
``[r.poll() for r in receivers]`` (what ``poll_and_all_reduce`` does before its all-reduce),
then the same for rooms with a final state pushed. Compares with one daemon round trip
(``KvdClient.poll``) per room. Run: python3 tools/bench_sglang_poll.py --rooms 1000
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "sglang"))

import torchvision_stub  # noqa: E402

torchvision_stub.install()

from tests.sglang.harness import Rank, kv_classes, server_args  # noqa: E402
from tools.cluster import start_daemon  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, default=1000)
    ap.add_argument("--loops", type=int, default=200)
    ap.add_argument("--round-trips", type=int, default=200, help="daemon polls to time for comparison")
    a = ap.parse_args()
    from sglang.srt.disaggregation.utils import DisaggregationMode

    C = kv_classes()
    tmp = Path(tempfile.mkdtemp(prefix="kvd-bench-poll-"))
    daemon = start_daemon(tmp, "decode")
    rk = Rank("decode", 1, 0, 2, 4, 16, 4, 64)
    rk.allocate()
    try:
        rk.mgr = C["manager"](rk.kv_args(), DisaggregationMode.DECODE, server_args(1, 1, daemon.socket_path), False)
        recvs = [C["receiver"](rk.mgr, "127.0.0.1:1", 10_000 + i) for i in range(a.rooms)]
        times = []
        for _ in range(a.loops):
            t0 = time.perf_counter()
            [r.poll() for r in recvs]
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        with daemon.client() as c:
            t0 = time.perf_counter()
            for i in range(a.round_trips):
                with contextlib.suppress(Exception):  # unknown_room: still one round trip
                    c.poll(10_000 + i)
            rt = (time.perf_counter() - t0) / a.round_trips
        print(f"rooms {a.rooms}: one scheduler-loop poll (backend, local view) median {med * 1e3:.3f} ms, "
              f"p99 {sorted(times)[int(len(times) * 0.99) - 1] * 1e3:.3f} ms "
              f"({med / a.rooms * 1e6:.2f} us/room); goal <= 1 ms: {'met' if med <= 1e-3 else 'NOT met'}")
        print(f"one daemon round trip (KvdClient.poll, unknown room): {rt * 1e6:.0f} us/room "
              f"-> {rt * a.rooms * 1e3:.1f} ms per loop of {a.rooms} rooms "
              f"({rt * a.rooms / med:.0f}x the local view)")
    finally:
        rk.close()
        daemon.stop()


if __name__ == "__main__":
    main()
