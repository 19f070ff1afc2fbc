"""The kvd demo: two real daemons on one machine move KV cache between fake engines, checked
byte for byte.

It starts a prefill daemon and a decode daemon (``python -m kvd`` on loopback, each with its
own socket and peer port), then one process per engine rank (tools/fake_engine.py): the
prefill ranks fill host pools with a known pattern and send every room, the decode ranks
receive every room into random pages of canary-filled pools and check every byte of their
pool. All ranks start their transfers at one barrier, so the reported speed is the bytes
and wall time of one and the same batch. Everything is torn down at the end (daemons
stopped, shared-memory segments unlinked); the exit status is non-zero on any mismatch.

    python tools/demo.py --prefill-tp 2 --decode-tp 1 --rooms 16
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from kvd.client import KvdError  # noqa: E402
from tools.cluster import DaemonProc, start_daemon  # noqa: E402
from tools.fake_engine import RoomPlan  # noqa: E402

FAKE_ENGINE = ROOT / "tools" / "fake_engine.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prefill-tp", type=int, default=2)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--rooms", type=int, default=16, help="requests to transfer")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8, help="total KV heads (ignored with --mla)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages-per-room", type=int, default=8)
    ap.add_argument("--num-pages", type=int, default=0,
                    help="pages per pool (0 = twice what the rooms need, so untouched pages are checked)")
    ap.add_argument("--chunk-pages", type=int, default=4, help="pages per SendChunk")
    ap.add_argument("--mla", action="store_true", help="MLA model: one latent head every rank holds")
    ap.add_argument("--hisparse", action="store_true", help="decode into HiSparse host pools (page size 1)")
    ap.add_argument("--per-slice", dest="staging", action="store_false",
                    help="run the daemons without staging (one write per token, layer and K/V); "
                         "by default heterogeneous TP goes through the staging buffer (MLA never does)")
    ap.add_argument("--daemon-args", default="", help="extra flags for both daemons, e.g. "
                    "'--transport-protocol rdma' (shell-quoted)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole transfer")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, plan)")
    return ap.parse_args(argv)


# Daemons: tools.cluster.start_daemon (shared with the tests and benchmarks).


# --- engine ranks ----------------------------------------------------------------------------------

@dataclass
class Rank:
    """One fake engine rank process; a thread turns its stdout into a queue of lines."""

    name: str
    proc: subprocess.Popen[str]
    log_path: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def next_line(self, deadline: float) -> str:
        try:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no output before the deadline") from None
        if not line:
            self.proc.wait(5)
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) early:\n{tail}")
        return line

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_rank(workdir: Path, name: str, argv: list[str]) -> Rank:
    log_path = workdir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(FAKE_ENGINE), *argv, "--wait-go"], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    return Rank(name, proc, log_path)


# --- plan ------------------------------------------------------------------------------------------

def make_plan(args: argparse.Namespace, num_pages: int) -> list[RoomPlan]:
    """Random, non-overlapping pages per room on both sides, random room ids (like SGLang's
    bootstrap_room). HiSparse destinations are token indices and the last page is cut short."""
    rng = np.random.default_rng(args.seed)
    n, ppr, ps = args.rooms, args.pages_per_room, args.page_size
    src = rng.permutation(num_pages)[:n * ppr].reshape(n, ppr)
    room_ids = rng.choice(2**62, size=n, replace=False) + 1
    if not args.hisparse:
        dst = rng.permutation(num_pages)[:n * ppr].reshape(n, ppr)
        return [RoomPlan(int(room_ids[i]), src[i].tolist(), dst[i].tolist()) for i in range(n)]
    free = rng.permutation(num_pages * ps)[:n * ppr * ps].reshape(n, ppr * ps)
    plans = []
    for i in range(n):
        length = (ppr - 1) * ps + int(rng.integers(1, ps + 1))
        plans.append(RoomPlan(int(room_ids[i]), src[i].tolist(), free[i, :length].tolist(), length))
    return plans


# --- the run ---------------------------------------------------------------------------------------

def _rank_argv(args: argparse.Namespace, role: str, sock: str, engine_id: str, tp: int, rank: int,
               num_pages: int, plan_path: Path, bootstrap: str, prefill_engine_id: str) -> list[str]:
    argv = ["--role", role, "--socket", sock, "--engine-id", engine_id, "--tp-size", str(tp),
            "--tp-rank", str(rank), "--layers", str(args.layers), "--kv-heads", str(args.kv_heads),
            "--head-dim", str(args.head_dim), "--dtype", args.dtype, "--page-size", str(args.page_size),
            "--num-pages", str(num_pages), "--plan", str(plan_path), "--seed", str(args.seed),
            "--chunk-pages", str(args.chunk_pages), "--bootstrap", bootstrap,
            "--timeout", str(args.timeout)]
    if role == "decode":
        argv += ["--prefill-engine-id", prefill_engine_id]
    return argv + (["--mla"] if args.mla else []) + (["--hisparse"] if args.hisparse and role == "decode"
                                                      else [])


def _unlink_leftover_shm(engine_ids: Sequence[str]) -> None:
    """Ranks unlink their own segments; this catches those of a rank that was killed."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        for eid in engine_ids:
            for leftover in shm.glob(f"kvd-{eid}-*"):
                leftover.unlink(missing_ok=True)


def _error_of(line: str) -> str:
    """The error of a rank's JSON report, or the raw line."""
    try:
        return str(json.loads(line).get("error") or line)
    except (ValueError, AttributeError):
        return line


def _write_ops(daemon: DaemonProc) -> int | None:
    try:
        return int(daemon.status().get("daemon", {}).get("write_ops_total"))
    except (KvdError, OSError, TypeError, ValueError):
        return None


def run(args: argparse.Namespace, workdir: Path) -> int:
    num_pages = args.num_pages or 2 * args.rooms * args.pages_per_room
    if args.rooms * args.pages_per_room > num_pages:
        raise SystemExit(f"--num-pages {num_pages} is too small for {args.rooms} rooms x "
                         f"{args.pages_per_room} pages")
    plan = make_plan(args, num_pages)
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps([r.to_dict() for r in plan]))
    tag = uuid.uuid4().hex[:6]
    prefill_id, decode_id = f"demo-p-{tag}", f"demo-d-{tag}"
    args.staging = args.staging and not args.mla  # MLA pools are refused while staging is on
    extra = shlex.split(args.daemon_args) + (["--staging-enabled"] if args.staging else [])
    daemons: list[DaemonProc] = []
    ranks: list[Rank] = []
    try:
        for name in ("kvd-prefill", "kvd-decode"):  # human-readable logs: flags given last win
            daemons.append(start_daemon(workdir, name, *extra, "--log-format", "console"))
        pre_d, dec_d = daemons
        print(f"daemons up: prefill {pre_d.address} ({pre_d.socket_path}), "
              f"decode {dec_d.address} ({dec_d.socket_path})")
        for r in range(args.prefill_tp):
            ranks.append(start_rank(workdir, f"prefill-{r}", _rank_argv(
                args, "prefill", pre_d.socket_path, prefill_id, args.prefill_tp, r, num_pages, plan_path,
                pre_d.address, "")))
        for r in range(args.decode_tp):
            ranks.append(start_rank(workdir, f"decode-{r}", _rank_argv(
                args, "decode", dec_d.socket_path, decode_id, args.decode_tp, r, num_pages, plan_path,
                pre_d.address, prefill_id)))
        deadline = time.monotonic() + 60
        for rank in ranks:
            line = rank.next_line(deadline)
            if not line.startswith("READY"):
                raise RuntimeError(f"{rank.name} did not get ready: {_error_of(line)}")
        ops_before = [_write_ops(d) for d in daemons]
        for rank in ranks:  # the barrier: every rank starts its transfers now
            rank.go()
        deadline = time.monotonic() + args.timeout + 30
        reports = {rank.name: json.loads(rank.next_line(deadline)) for rank in ranks}
        ops_after = [_write_ops(d) for d in daemons]
        return report(args, plan, reports, daemons, ops_before, ops_after)
    except (RuntimeError, ValueError) as exc:
        tails = "".join(f"\n--- {d.name} log (last lines) ---\n{d.log_tail()}" for d in daemons)
        raise RuntimeError(f"{exc}{tails}") from None
    finally:
        for rank in ranks:
            rank.stop()
        for d in daemons:
            d.stop()
        _unlink_leftover_shm([prefill_id, decode_id])


def report(args: argparse.Namespace, plan: list[RoomPlan], reports: dict[str, dict[str, Any]],
           daemons: list[DaemonProc], ops_before: list[int | None], ops_after: list[int | None]) -> int:
    """Print the outcome; 0 only if every rank succeeded and every byte matched."""
    bad = 0
    for name, rep in reports.items():
        problems = [f"error: {rep['error']}"] if rep.get("error") else []
        problems += [f"room {room} failed: {why}" for room, why in rep.get("rooms_failed", {}).items()]
        problems += rep.get("mismatches", [])
        state = "ok" if not problems else "FAILED"
        print(f"  {name:<10} {state:<6} rooms ok {rep.get('rooms_ok', 0)}/{len(plan)}  "
              f"bytes {rep.get('bytes', 0):,}")
        for line in problems[:20]:
            print(f"      {line}")
        bad += bool(problems)
    decode = [r for n, r in reports.items() if n.startswith("decode")]
    nbytes = sum(int(r.get("bytes", 0)) for r in decode)
    starts = [r["t_start"] for r in reports.values() if r.get("t_start")]
    ends = [r["t_end"] for r in reports.values() if r.get("t_end")]
    wall = max(ends) - min(starts) if starts and ends else float("nan")
    ops = []
    for d, before, after in zip(daemons, ops_before, ops_after, strict=True):
        ops.append(f"{d.name} {after - before if before is not None and after is not None else 'n/a'}")
    kind = "MLA" if args.mla else f"{args.kv_heads} kv heads"
    print(f"transfer  prefill TP {args.prefill_tp} -> decode TP {args.decode_tp}, {kind}, "
          f"{args.layers} layers, head_dim {args.head_dim}, {args.dtype}, page {args.page_size}"
          + (", HiSparse" if args.hisparse else "") + (", staged (gather, bulk write, scatter)" if args.staging else ", per-slice"))
    print(f"rooms     {len(plan)} ({args.pages_per_room} pages each)")
    print(f"bytes     {nbytes:,} verified in decode pools")
    print(f"writes    {', '.join(ops)} (write ops during the batch)")
    if wall > 0:
        print(f"wall      {wall:.3f} s (first rank start to last rank done, one batch)")
        print(f"speed     {nbytes / wall / 1e9:.3f} GB/s, {len(plan) / wall:.1f} rooms/s")
    print("RESULT    " + ("PASS: byte-exact" if bad == 0 else f"FAIL: {bad} rank(s) reported problems"))
    return 0 if bad == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # AF_UNIX paths are limited to ~108 bytes: keep the work directory short.
    workdir = Path(tempfile.mkdtemp(prefix="kvd-demo-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        return run(args, workdir)
    except (RuntimeError, ValueError) as exc:  # ValueError: a rank printed no valid JSON report
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"logs and plan kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)  # logs, plan and the daemons' keys (trust/)


if __name__ == "__main__":
    sys.exit(main())
