"""Does a Mooncake TCP write that *failed* still land later? (Why kvd never trusts a failed write.)

A receiver process registers a buffer and is stopped (SIGSTOP) before the sender writes a
batch of ``--ops`` slices into it. The batch call returns failure after Mooncake's progress
timeout. The sender then unmaps its source (as a prefill pool closed after its room failed)
and the receiver resumes. The probe prints how many bytes reached the receiver *after* the
call had failed, and whether the sender process survived its transport touching the unmapped
source. kvd's write fence assumes the worst this shows: every failed write makes its receiver
``unsure`` and only revoking the sender's receive session releases the pages.

    python3 tools/probe_late_writes.py            # 8 MiB in 64 slices, 3 s timeout
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import signal
import time
from typing import Any


def _receiver(q: Any, nbytes: int, wait_s: float) -> None:
    import numpy as np
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("Mooncake initialize failed")
    buf = np.zeros(nbytes + 4096, np.uint8)  # the last page takes the warm-up write
    if engine.register_memory(buf.ctypes.data, buf.nbytes) != 0:
        raise SystemExit("register_memory failed")
    q.put((f"127.0.0.1:{engine.get_rpc_port()}", buf.ctypes.data))
    time.sleep(wait_s)  # stopped and resumed by the parent meanwhile
    q.put(int(np.count_nonzero(buf[:nbytes])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=8, help="bytes written, MiB")
    ap.add_argument("--ops", type=int, default=64, help="slices in the batch")
    ap.add_argument("--timeout", type=int, default=3, help="Mooncake transfer/progress timeout, s")
    args = ap.parse_args()
    os.environ["MC_TRANSFER_TIMEOUT"] = os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"] = str(args.timeout)
    nbytes = args.mib << 20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(q, nbytes, args.timeout + 15.0))
    proc.start()
    session, raddr = q.get(timeout=60)

    import numpy as np
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("Mooncake initialize failed")
    region = mmap.mmap(-1, nbytes)
    src = np.frombuffer(region, np.uint8)
    src[:] = 7
    saddr = src.ctypes.data
    engine.register_memory(saddr, nbytes)
    warm = engine.transfer_sync_write(session, saddr, raddr + nbytes, 64)  # connect while it runs
    os.kill(proc.pid, signal.SIGSTOP)
    size = nbytes // args.ops
    t0 = time.monotonic()
    rc = engine.batch_transfer_sync_write(session, [saddr + i * size for i in range(args.ops)],
                                          [raddr + i * size for i in range(args.ops)], [size] * args.ops)
    failed_after = time.monotonic() - t0
    engine.unregister_memory(saddr)
    del src
    region.close()  # the source is gone, as a closed pool's
    os.kill(proc.pid, signal.SIGCONT)
    landed = q.get(timeout=args.timeout + 60)
    proc.join(10)
    print(f"warm-up write rc {warm}; batch of {args.ops} slices ({args.mib} MiB) to a stopped receiver: "
          f"rc {rc} after {failed_after:.1f} s")
    print(f"bytes that reached the receiver after the call had failed: {landed:,} "
          f"({landed / nbytes:.1%} of the batch); the sender process is alive")


if __name__ == "__main__":
    main()
