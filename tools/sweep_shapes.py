"""Random shapes through two real daemons, every byte checked: TP sizes 1-8 on each side
(dividing each other or not), GQA and MLA, HiSparse, 1-3 layers, head_dim 8-64, five dtypes,
pages of 1-16 tokens, chunked sends, scattered or contiguous page lists.

    python3 tools/sweep_shapes.py [--seed 2] [--cases 25] [-- daemon flags...]

Prints one line per case (OK / BAD with the failing ranks' reasons) and exits non-zero if any
case was not byte-exact. Only layouts SGLang can have are drawn (kv heads and TP size divide
one way or the other on each side)."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.cluster import failures, run_cluster, start_daemon  # noqa: E402

FLAGS = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
         "--timeouts-abort-fence-s", "2")
TPS = [1, 2, 3, 4, 6, 8]
HEADS = [1, 2, 3, 4, 6, 8, 12, 16]
DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn", "int8"]


def draw(rng: random.Random) -> dict:
    """One case: a layout pair SGLang could run, and how the engines send it."""
    ptp, dtp = rng.choice(TPS), rng.choice(TPS)
    mla = rng.random() < 0.15
    hisparse = not mla and rng.random() < 0.3
    heads = 1 if mla else rng.choice([h for h in HEADS if all(h % t == 0 or t % h == 0 for t in (ptp, dtp))])
    return dict(prefill_tp=ptp, decode_tp=dtp, kv_heads=heads, mla=mla, hisparse=hisparse,
                layers=rng.choice([1, 2, 3]), head_dim=rng.choice([8, 16, 24, 64]),
                page_size=rng.choice([1, 2, 4, 16]), num_pages=rng.choice([16, 64]),
                rooms=rng.choice([1, 3]), pages_per_room=rng.choice([1, 5]),
                chunk_pages=rng.choice([1, 2, 3, 7]), dtype=rng.choice(DTYPES),
                contiguous=rng.random() < 0.3, timeout=40)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--cases", type=int, default=25)
    ap.add_argument("daemon_flags", nargs="*", help="extra flags for both daemons (after --)")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="kvd-sweep-") as tmp:
        pre = start_daemon(Path(tmp), "prefill", *FLAGS, *a.daemon_flags)
        dec = start_daemon(Path(tmp), "decode", *FLAGS, *a.daemon_flags)
        try:
            for _ in range(a.cases):
                case = draw(rng)
                t0 = time.monotonic()
                try:
                    reports = run_cluster(pre, dec, **case)
                    wrong = failures(reports)
                    ok = not wrong and any(r.role == "decode" and r.bytes > 0 for r in reports)
                except Exception as exc:  # a case that cannot even run is a BAD line, not the end
                    wrong, ok = [repr(exc)], False
                print(f"{'OK ' if ok else 'BAD'} {time.monotonic() - t0:5.1f} s {case}", flush=True)
                if not ok:
                    bad += 1
                    print(f"    {str(wrong)[:2000]}", flush=True)
                if not (pre.alive() and dec.alive()):
                    print("a daemon died", flush=True)
                    return 2
        finally:
            pre.stop()
            dec.stop()
    print(f"{a.cases - bad} of {a.cases} cases byte-exact")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
