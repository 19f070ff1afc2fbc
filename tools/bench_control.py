"""Control-plane benchmark: tiny rooms through two real daemons and Mooncake (issue 15).

A tiny room is 1 page of 1 layer, 256 bytes (1 kv head x head_dim 64 x bf16, K and V).
One driver process (uvloop) plays a prefill engine rank and a decode engine rank, each with
its own socket connection to its own daemon; the daemons talk over ZMQ and write with
Mooncake over loopback TCP, exactly as in production. Phases: sequential (1 in flight),
then 32 and 256 in flight. Per phase it prints rooms/s, latency percentiles (from the
engine's ``recv``+``send`` to both engines holding the final event) and each daemon's CPU
per room (``/proc/<pid>/stat`` utime+stime deltas over the phase; the driver's own CPU too).

    python3 tools/bench_control.py                    # the three phases
    python3 tools/bench_control.py --rooms 4000 --inflight 256
    python3 tools/bench_control.py --profile prof     # py-spy on both daemons during the
                                                      # last phase; top frames printed,
                                                      # flamegraphs under prof/
    python3 tools/bench_control.py --datapath         # also the CPU data-path ratios
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from kvd.engineclient.client import AsyncKvdClient  # noqa: E402
from kvd.engineclient.hostpool import HostPool  # noqa: E402
from kvd.engineclient.replies import ReplyTracker, RoomFailed, RoomStatus  # noqa: E402
from tools.cluster import DaemonProc, start_daemon  # noqa: E402
from tools.fake_engine import build_layout  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def stop_daemons(*daemons: DaemonProc) -> None:
    """Stop the benchmark's daemons, saying so (with its log) for one that died under load."""
    for d in daemons:
        if not d.alive():
            print(f"daemon {d.name} died:\n{d.log_tail()}")
        d.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process by kind of thread: the event loop (the main thread), ZMQ's I/O
    thread, and every other thread (executor workers and Mooncake's own, which py-spy does not
    see)."""
    out = {"loop": 0.0, "zmq": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        kind = "loop" if task.name == str(pid) else "zmq" if comm.startswith("ZMQbg") else "other"
        out[kind] += (int(fields[11]) + int(fields[12])) / TICK
    return out


class BenchClient(AsyncKvdClient):
    """The async client with a future per room instead of one condition every waiter wakes on
    (at 256 rooms in flight the stock ``wait()`` would wake 256 coroutines per event and the
    driver, not the daemons, would be measured)."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        super().__init__(socket_path, timeout)
        self.waiters: dict[int, tuple[asyncio.Future[RoomStatus], bool]] = {}

    def expect(self, room: int, released: bool) -> asyncio.Future[RoomStatus]:
        fut: asyncio.Future[RoomStatus] = asyncio.get_running_loop().create_future()
        self.waiters[room] = (fut, released)
        return fut

    async def _dispatch(self, payload: bytes) -> None:
        msg = self._t.decode_frame(payload)
        if self._t.is_push(msg):
            st = RoomStatus.from_event(msg)  # type: ignore[arg-type]
            w = self.waiters.get(st.room)
            if w is not None and st.done and (st.released or not w[1]):
                del self.waiters[st.room]
                if not w[0].done():
                    w[0].set_result(st)
            return
        fut = self._pending.pop(getattr(msg, "req_id", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)


class EnginePair:
    """A prefill engine rank and a decode engine rank (TP 1 each), each with a host pool of
    ``shape`` registered with its own daemon; ``async with`` connects and registers."""

    def __init__(self, prefill: DaemonProc, decode: DaemonProc, **shape: Any) -> None:
        self.prefill, self.decode = prefill, decode
        self.play = build_layout("prefill", "P", 1, 0, **shape)
        self.dlay = build_layout("decode", "D", 1, 0, **shape)
        self.next_room = 1

    async def __aenter__(self) -> Self:
        self.ppool, self.dpool = HostPool.create(self.play), HostPool.create(self.dlay)
        self.pc, self.dc = BenchClient(self.prefill.socket_path), BenchClient(self.decode.socket_path)
        await self.pc.connect()
        await self.dc.connect()
        self.pid_p = await self.pc.register_pool(self.play, self.ppool, bootstrap="")
        self.pid_d = await self.dc.register_pool(self.dlay, self.dpool)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pc.close()
        await self.dc.close()
        for pool in (self.ppool, self.dpool):
            pool.unlink()
            pool.close()


class Driver(EnginePair):
    """Tiny rooms: 1 page of 1 token, 1 layer, 1 kv head of 64 bf16 (256 bytes with K and V)."""

    def __init__(self, prefill: DaemonProc, decode: DaemonProc, num_pages: int) -> None:
        super().__init__(prefill, decode, layers=1, kv_heads=1, head_dim=64, dtype="bfloat16", page_size=1,
                         num_pages=num_pages)
        self.num_pages = num_pages
        assert self.play.page_bytes * self.play.num_buffers == 256

    async def room(self) -> float:
        room, self.next_room = self.next_room, self.next_room + 1
        page = room % self.num_pages
        t0 = time.perf_counter()
        dfut, pfut = self.dc.expect(room, released=True), self.pc.expect(room, released=False)
        await asyncio.gather(
            self.dc.recv(self.pid_d, room, self.prefill.address, "P", [page]),
            self.pc.send(self.pid_p, room, [page], is_last=True, aux=b"t"))
        for st in await asyncio.gather(dfut, pfut):
            ReplyTracker.check_final(st)
        return time.perf_counter() - t0

    async def phase(self, rooms: int, inflight: int) -> dict[str, Any]:
        lat: list[float] = []
        failed: Counter[str] = Counter()
        pids = {"prefill": self.prefill.proc.pid, "decode": self.decode.proc.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        threads0 = {k: thread_cpu(p) for k, p in pids.items()}
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        left = rooms

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    lat.append(await self.room())
                except RoomFailed as exc:
                    failed[str(exc)[:80]] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall = time.perf_counter() - t0
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        threads = {k: {kind: sec - threads0[k][kind] for kind, sec in thread_cpu(p).items()}
                   for k, p in pids.items()}
        cpu["driver"] = me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
        a = np.sort(np.asarray(lat)) * 1e3 if lat else np.zeros(1)
        return {"inflight": inflight, "rooms": rooms, "failed": dict(failed), "seconds": wall,
                "rooms_per_s": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99)), "p999_ms": float(np.percentile(a, 99.9)),
                "max_ms": float(a[-1]),
                **{f"cpu_us_per_room_{k}": v / max(1, len(lat)) * 1e6 for k, v in cpu.items()},
                **{f"cpu_us_per_room_{k}_{kind}": v / max(1, len(lat)) * 1e6
                   for k, kinds in threads.items() for kind, v in kinds.items()}}


def show(r: dict[str, Any]) -> None:
    print(f"  {r['inflight']:>4} in flight, {r['rooms']:>6} rooms: {r['rooms_per_s']:>8,.0f} rooms/s  "
          f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  p999 {r['p999_ms']:7.2f} ms  "
          f"CPU/room prefill {r['cpu_us_per_room_prefill']:6.0f} us, decode {r['cpu_us_per_room_decode']:6.0f} us, "
          f"driver {r['cpu_us_per_room_driver']:6.0f} us" + (f"  FAILED {r['failed']}" if r["failed"] else ""),
          flush=True)
    print("      by thread, us/room: " + "; ".join(
        f"{side} loop {r[f'cpu_us_per_room_{side}_loop']:.0f}, zmq {r[f'cpu_us_per_room_{side}_zmq']:.0f}, "
        f"other (executor + Mooncake) {r[f'cpu_us_per_room_{side}_other']:.0f}" for side in ("prefill", "decode")),
        flush=True)


# --- profile: py-spy on both daemons ----------------------------------------------------------

def start_pyspy(pid: int, out: Path, seconds: float, rate: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
                             "--duration", str(int(seconds)), "--rate", str(rate), "--nonblocking",
                             "--threads", "--gil"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def top_frames(raw: Path, n: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks, sampled
    only while a thread holds the GIL (``--gil``): the daemon's Python CPU, idle excluded."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        frames = stack.split(";")
        total += c
        threads[frames[0].split(" (")[0]] += c
        names = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0].rstrip(")") for f in frames[1:]]
        if names:
            self_c[names[-1]] += c
        for name in set(names):
            incl[name] += c
    lines = [f"  {total} samples; per thread: " + ", ".join(f"{t} {c / total:.0%}" for t, c in threads.most_common(4)),
             "  self:"]
    lines += [f"    {c / total:6.1%}  {name}" for name, c in self_c.most_common(n)]
    lines.append("  inclusive:")
    lines += [f"    {c / total:6.1%}  {name}" for name, c in incl.most_common(n)]
    return "\n".join(lines)


# --- the CPU data path: kvd vs raw Mooncake, all in one run ------------------------------------

def datapath(quick: bool) -> dict[str, Any]:
    from tools.bench_staged import run as staged_run
    from tools.cluster import failures, run_cluster, throughput
    from tools.raw_mooncake import measure_raw_write

    out: dict[str, Any] = {}
    flags = ("--timeouts-waiting-s", "600", "--timeouts-transfer-s", "600")
    tokens, rooms = (2048, 2) if quick else (4096, 4)

    def direct(hisparse: bool) -> tuple[int, float]:
        with tempfile.TemporaryDirectory(prefix="kvd-bench-") as tmp:
            prefill = start_daemon(Path(tmp), "prefill", *flags)
            decode = start_daemon(Path(tmp), "decode", *flags)
            try:
                pages = tokens // 16
                reports = run_cluster(prefill, decode, prefill_tp=1, decode_tp=1, kv_heads=8, layers=16,
                                      head_dim=128, page_size=16, num_pages=pages * rooms, rooms=rooms,
                                      pages_per_room=pages, hisparse=hisparse, chunk_pages=64, timeout=600,
                                      contiguous=True)
            finally:
                prefill.stop()
                decode.stop()
        bad = failures(reports)
        if bad:
            raise SystemExit(f"transfer failed: {bad}")
        return throughput(reports)

    for name, hisparse in (("same_tp", False), ("hisparse", True)):
        nbytes, seconds = direct(hisparse)
        raw = measure_raw_write(nbytes)
        out[name] = {"bytes": nbytes, "kvd_gbps": nbytes / seconds / 1e9, "raw_gbps": nbytes / raw / 1e9,
                     "ratio": raw / seconds}
    s = staged_run(True, 4, 1, layers=16, tokens=tokens, rooms=rooms)
    raw = measure_raw_write(s["bytes"])
    out["staged_4to1"] = {"bytes": s["bytes"], "kvd_gbps": s["gbps"], "raw_gbps": s["bytes"] / raw / 1e9,
                          "ratio": s["gbps"] / (s["bytes"] / raw / 1e9), "gather_s": s["gather_s"],
                          "scatter_s": s["scatter_s"], "seconds": s["seconds"]}
    for name, f in out.items():
        print(f"  {name:<12} {f['bytes'] / 2**20:6.0f} MiB  kvd {f['kvd_gbps']:.3f} GB/s  raw {f['raw_gbps']:.3f} GB/s"
              f"  kvd/raw {f['ratio']:.2f}" + (f"  (gather {f['gather_s']:.2f} s, scatter {f['scatter_s']:.2f} s "
                                               f"of {f['seconds']:.2f} s)" if "gather_s" in f else ""), flush=True)
    return out


async def control(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    flags = ("--timeouts-waiting-s", "60", "--timeouts-transfer-s", "60", *args.daemon_flag)
    prefill = start_daemon(tmp, "prefill", *flags)
    decode = start_daemon(tmp, "decode", *flags)
    results: list[dict[str, Any]] = []
    try:
        async with Driver(prefill, decode, num_pages=4096) as d:
            await d.phase(200, 8)  # warm: directory, pool announce, receive session, executors
            phases = [(args.seq_rooms, 1)] + [(args.rooms, n) for n in args.inflight]
            for i, (rooms, inflight) in enumerate(phases):
                spies = []
                if args.profile and i == len(phases) - 1:
                    prof = Path(args.profile)
                    prof.mkdir(parents=True, exist_ok=True)
                    est = max(3.0, rooms / max(1.0, results[-1]["rooms_per_s"] if results else 100.0))
                    spies = [(name, prof / f"{name}.txt", start_pyspy(p.proc.pid, prof / f"{name}.txt",
                                                                       min(est, 60), args.rate))
                             for name, p in (("prefill", prefill), ("decode", decode))]
                    await asyncio.sleep(1.0)  # py-spy attaches
                r = await d.phase(rooms, inflight)
                show(r)
                results.append(r)
                for name, path, spy in spies:
                    _, err = spy.communicate(timeout=120)
                    if not path.exists():
                        print(f"  py-spy on {name} wrote nothing: {err.decode(errors='replace')[-400:]}")
                        continue
                    text = top_frames(path)
                    (path.parent / f"{name}.top.txt").write_text(text + "\n")
                    print(f"--- {name} daemon, py-spy ({path}):\n{text}")
    finally:
        stop_daemons(prefill, decode)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seq-rooms", type=int, default=1000, help="rooms of the sequential phase")
    ap.add_argument("--rooms", type=int, default=5000, help="rooms of each concurrent phase")
    ap.add_argument("--inflight", type=int, nargs="*", default=[32, 256])
    ap.add_argument("--profile", metavar="DIR", help="py-spy both daemons during the last phase")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--daemon-flag", action="append", default=[], help="extra daemon flag (repeatable)")
    ap.add_argument("--datapath", action="store_true", help="also kvd/raw on the CPU data path")
    ap.add_argument("--only-datapath", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller data-path transfers")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    if not args.only_datapath:
        print("tiny rooms (1 page x 1 layer, 256 B), two daemons, Mooncake TCP on loopback:", flush=True)
        with tempfile.TemporaryDirectory(prefix="kvd-ctl-") as tmp:
            try:
                import uvloop
                out["control"] = uvloop.run(control(args, Path(tmp)))
            except ImportError:  # pragma: no cover
                out["control"] = asyncio.run(control(args, Path(tmp)))
    if args.datapath or args.only_datapath:
        print("CPU data path, 16 layers x 8 kv heads x 128, bf16, page 16, contiguous rooms:", flush=True)
        out["datapath"] = datapath(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
