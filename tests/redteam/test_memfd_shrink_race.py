"""Red team round 9: a memfd that shrinks between kvd's size check and its seal.

``open_fd_pool`` measured the handed-over descriptor, then sealed it against shrinking. The
engine keeps its own descriptor of the memfd, so it could ftruncate it in between: the size
check had passed and the seal then held the *shrunk* size. Python's mmap checks the size once
more (no SIGBUS), but its ValueError was not a registration refusal: the engine heard an
``internal`` error and the daemon logged it as a bug with its traceback (``engine_request_bug``),
as it did for a memfd sealed against writes (mmap's PermissionError). Now the descriptor is
sealed first and measured after, and a descriptor that cannot be mapped is refused as such. The
race is made deterministic by shrinking the file at the last moment before the seal (what a
racing engine thread does). Invariant: refused (PoolMemoryError), or the mapping is whole.

Run in a child process, since a mapping past the end of a file fails by signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import fcntl, os
    from kvd.core.layout import PoolLayout
    from kvd.mem import fdpool
    from kvd.mem.opened import PoolMemoryError

    layout = PoolLayout(engine_id="e", role="decode", tp_size=1, tp_rank=0, num_layers=2, total_kv_heads=2,
                        head_dim=64, dtype="bfloat16", page_size=16, num_pages=64)
    need = layout.num_buffers * layout.buffer_bytes
    offsets = [i * layout.buffer_bytes for i in range(layout.num_buffers)]

    def memfd():
        fd = os.memfd_create("pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, need)
        return fd

    # 1. the engine shrinks its memfd just before kvd seals it
    engine = memfd()
    kvd_fd = os.dup(engine)
    real_seal = fdpool._seal_shrink
    def racing_seal(fd):
        os.ftruncate(engine, 4096)  # the engine's own descriptor, from its own thread
        return real_seal(fd)
    fdpool._seal_shrink = racing_seal
    try:
        pool = fdpool.open_fd_pool(layout, {"kind": "fd", "fd": fdpool.ReceivedFd(kvd_fd, 0), "offsets": offsets})
        assert os.fstat(engine).st_size >= need, "mapped past the end of the file"
        print("RACE mapped-whole")
    except PoolMemoryError as exc:
        print("RACE refused", str(exc)[:60])
    except Exception as exc:
        print("RACE raised", type(exc).__name__, exc)
    fdpool._seal_shrink = real_seal

    # 2. a memfd sealed against writes: a refusal of the registration, not an OSError
    sealed = memfd()
    fcntl.fcntl(sealed, 1033, 0x0008)  # F_ADD_SEALS, F_SEAL_WRITE
    try:
        fdpool.open_fd_pool(layout, {"kind": "fd", "fd": fdpool.ReceivedFd(os.dup(sealed), 0), "offsets": offsets})
        print("WRITE-SEALED mapped")
    except PoolMemoryError as exc:
        print("WRITE-SEALED refused", str(exc)[:60])
    except Exception as exc:
        print("WRITE-SEALED raised", type(exc).__name__, exc)
""")


def test_a_memfd_shrunk_before_the_seal_is_refused_not_a_sigbus() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kvd's process died (rc {r.returncode}): {r.stderr[-800:]}"
    out = r.stdout
    assert "RACE refused" in out or "RACE mapped-whole" in out, out  # not "RACE raised ValueError"
    assert "WRITE-SEALED refused" in out, (out, r.stderr[-800:])
