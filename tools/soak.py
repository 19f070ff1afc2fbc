"""Long fault-injection soak: the CI fault suite's scenarios and fuzzing, repeated for hours.

Every round runs each chosen fault on each chosen path (tools/faultkit.py: daemons on
network-namespace nodes, fake engines, the invariants checked after every fault), then a
fuzz round (tools/fuzz.py) of ``--fuzz`` malformed inputs on each socket followed by a clean
transfer. Each violation is printed with its evidence and appended to ``--out`` as JSON
lines; the exit status is 1 if any invariant broke. Needs root (ip netns).

    python3 tools/soak.py --minutes 120                          # everything, for two hours
    python3 tools/soak.py --rounds 3 --faults stop_prefill,partition --paths direct
    python3 tools/soak.py --minutes 30 --fuzz 500000 --faults none  # mostly fuzzing
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.faultkit import ALL_FAULTS, PATHS, Cluster, fresh_transfer, log_problems, run_many, wait_reclaimed  # noqa: E402
from tools.fuzz import fuzz_engine_socket, fuzz_peer  # noqa: E402
from tools.netns import enter  # noqa: E402


def _engine_fuzz(q, netns, sock, n, seed):
    enter(netns)
    q.put(("engine", fuzz_engine_socket(sock, n, seed, deadline_s=3600)))


def _peer_fuzz(q, netns, address, n, seed):
    enter(netns)
    q.put(("peer", fuzz_peer(address, n, seed)))


def fuzz_round(tmp: Path, n: int, seed: int) -> list[str]:
    cl = Cluster(tmp, PATHS["direct"])
    problems: list[str] = []
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_engine_fuzz, args=(q, cl.dnodes[0].netns, cl.decodes[0].socket_path, n, seed)),
                 ctx.Process(target=_peer_fuzz, args=(q, cl.dnodes[0].netns, cl.prefill.address, n, seed + 1))]
        for p in procs:
            p.start()
        stats = dict(q.get(timeout=7200) for _ in procs)
        for p in procs:
            p.join(10)
        print(f"  fuzz {stats}", flush=True)
        for d in cl.daemons():
            if not d.alive():
                problems.append(f"daemon {d.name} died: {d.log_tail(10)}")
                continue
            left = wait_reclaimed(d, 10)
            if left:
                problems.append(f"daemon {d.name} not reclaimed: {left}")
            problems += log_problems(d)
        problems += fresh_transfer(cl, 7000, seed)
    except Exception as exc:
        problems.append(f"fuzz round aborted: {type(exc).__name__}: {exc}")
    finally:
        cl.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="stop starting rounds after this long")
    ap.add_argument("--rounds", type=int, default=0, help="at most this many rounds (0: no limit)")
    ap.add_argument("--faults", default=",".join(ALL_FAULTS[1:]), help="comma-separated, from: " + ",".join(ALL_FAULTS))
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: " + ",".join(PATHS))
    ap.add_argument("--fuzz", type=int, default=200_000, help="malformed inputs per socket per round (0: none)")
    ap.add_argument("--parallel", type=int, default=3, help="scenarios run at once")
    ap.add_argument("--out", default="soak-violations.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep daemon logs (printed directory)")
    args = ap.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    paths = [p for p in args.paths.split(",") if p]
    for f in faults:
        if f not in ALL_FAULTS:
            ap.error(f"unknown fault {f!r}")
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}")
    tmp = Path(tempfile.mkdtemp(prefix="kvd-soak-"))
    print(f"logs under {tmp}", flush=True)
    t_end = time.monotonic() + args.minutes * 60
    total = 0
    rnd = 0
    with open(args.out, "a") as out:
        while time.monotonic() < t_end and (not args.rounds or rnd < args.rounds):
            rnd += 1
            jobs = [(p, f) for f in faults for p in paths]
            for i in range(0, len(jobs), max(1, args.parallel)):
                if time.monotonic() >= t_end:
                    break
                for (path, fault), res in run_many(tmp / f"r{rnd}", jobs[i:i + args.parallel]).items():
                    print(f"round {rnd} " + res.summary().split("\n  note:")[0], flush=True)
                    for v in res.violations:
                        out.write(json.dumps({"round": rnd, "fault": fault, "path": path, "violation": v,
                                              "timings": res.timings}) + "\n")
                    total += len(res.violations)
            if args.fuzz and time.monotonic() < t_end:
                problems = fuzz_round(tmp / f"r{rnd}-fuzz", args.fuzz, rnd)
                print(f"round {rnd} fuzz x{args.fuzz}: {len(problems)} problems", flush=True)
                for v in problems:
                    print("  VIOLATION:", v[:2000], flush=True)
                    out.write(json.dumps({"round": rnd, "fault": "fuzz", "violation": v}) + "\n")
                total += len(problems)
            out.flush()
    print(f"{rnd} rounds, {total} violations (see {args.out})", flush=True)
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
