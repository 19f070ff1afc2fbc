"""End to end on a GPU: two real daemons, fake engine ranks in their own processes whose pools
are CUDA tensors handed over as CUDA IPC handles, Mooncake over TCP, every byte checked on
the GPU. Prints the staged throughput, a raw Mooncake bulk write of the same bytes between
the same kind of memory in the same run, and how much kernel time the pipelining hid.

    python3 tools/gpu_e2e.py --prefill-tp 4 --decode-tp 1 --tokens 131072 --layers 32

Every value is a function of (buffer, global head, source token, element), so a decode rank
computes what each of its rows must hold without asking anyone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CANARY = 0x1357
WARMUP_ROOM = 999


@dataclass
class Report:
    role: str
    rank: int
    ok: bool = False
    bytes: int = 0
    t_start: float = 0.0  # one timed span (tools/gpu_two.py)
    t_end: float = 0.0
    # One entry per round (--repeat): the engines' start, prefill's first chunk (every room of
    # every rank bootstrapped: KV "ready"), and the end (every room of the round ended).
    starts: list[float] = field(default_factory=list)
    sends: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    error: str = ""
    mismatches: list[str] = field(default_factory=list)


def _layout(role, engine, tp, rank, a):
    from kvd.layout import PoolLayout

    return PoolLayout(engine, role, tp, rank, a.layers, a.kv_heads, a.head_dim, "bfloat16", a.page_size,
                      a.num_pages)


def _expected(torch, b: int, heads, src_tokens, head_dim: int, device):
    """int16 pattern of buffer b for the given global heads and source tokens: [T, H, D]."""
    t = src_tokens.to(torch.int64)[:, None, None]
    h = torch.as_tensor(list(heads), device=device, dtype=torch.int64)[None, :, None]
    d = torch.arange(head_dim, device=device, dtype=torch.int64)[None, None, :]
    return ((b * 7919 + h * 104729 + t * 31 + d * 3) & 0x7FFF).to(torch.int16)


def _plan(a, rnd: int = 0):
    """Round ``rnd``'s rooms: every round moves the same pages (new room ids). Page lists are
    numpy arrays, as SGLang hands them to its backend (a Python list costs the engine a
    conversion per chunk: about 1 ms for 8,192 pages on the GPU host)."""
    import numpy as np

    pages = a.tokens // a.page_size
    rooms = []
    for i in range(a.rooms):
        src = np.arange(i * pages, (i + 1) * pages, dtype=np.int64)
        dst = np.arange(a.num_pages - (i + 1) * pages, a.num_pages - i * pages, dtype=np.int64)  # other pages
        rooms.append((1000 + rnd * a.rooms + i, src, dst))
    return rooms


def _until_bootstrapped(c, rooms, timeout: float) -> None:
    """Poll until the decode side's request for every room reached this rank's daemon.

    SGLang's prefill scheduler holds a request in its bootstrap queue until the sender polls
    WaitingForInput, and only then computes it, so its KV is never ready before this point.
    """
    from kvd.engineclient.replies import KvdUnknownError

    deadline = time.monotonic() + timeout
    for room in rooms:
        while True:
            try:
                if c.poll(room).state != "bootstrapping":
                    break
            except KvdUnknownError:
                pass  # the decode daemon's request has not arrived yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"room {room} never bootstrapped")
            time.sleep(0.0002)


def _start_spy(a):
    """py-spy on the prefill daemon for the timed rounds only (after the warm-up): every
    thread, idle samples included, so the event loop's busy and waiting time both show (or,
    with ``--spy-gil``, only the thread holding the GIL: who keeps the others waiting)."""
    import subprocess

    path, pid = a.spy
    mode = ["--gil"] if a.spy_gil else ["--idle"]
    proc = subprocess.Popen([a.spy_bin, "record", "--pid", str(pid), "--threads", *mode, "--rate", "200",
                             "-f", "raw", "-o", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first round
    return proc


def _prefill(q, barrier, sock, rank, a, bootstrap, send_barrier):
    import torch

    from kvd.client import KvdClient
    from kvd.gpupool import allocate_gpu_pool, cuda_ipc_memory

    rep = Report("prefill", rank)
    try:
        lay = _layout("prefill", "P", a.prefill_tp, rank, a)
        bufs = allocate_gpu_pool(lay)
        tokens = torch.arange(lay.num_tokens, device="cuda")
        for b, buf in enumerate(bufs):
            buf.view(torch.int16).copy_(_expected(torch, b, lay.head_range(), tokens, lay.head_dim, "cuda"))
        torch.cuda.synchronize()
        with KvdClient(sock, timeout=60) as c:
            pid = c.register_pool(lay, cuda_ipc_memory(bufs), bootstrap=bootstrap)
            if a.warmup_tokens:  # one untimed room first: kernels compiled, paths decided, handles opened
                _, src, _ = _plan(a)[0]
                c.send(pid, WARMUP_ROOM, src[:max(1, a.warmup_tokens // a.page_size)], True, aux=b"aux")
                c.wait(WARMUP_ROOM, timeout=a.timeout)
            chunk = max(1, a.chunk_tokens // a.page_size)
            spy = _start_spy(a) if rank == 0 and a.spy else None
            for rnd in range(a.repeat):
                barrier.wait()
                rep.starts.append(time.time())
                _until_bootstrapped(c, [room for room, _, _ in _plan(a, rnd)], a.timeout)
                send_barrier.wait()  # every prefill rank's KV is "ready" at once, as after a forward pass
                rep.sends.append(time.time())
                for room, src, _ in _plan(a, rnd):
                    for i in range(0, len(src), chunk):
                        last = i + chunk >= len(src)
                        c.send(pid, room, src[i:i + chunk], last, aux=b"aux" if last else b"",
                               wait=a.blocking_sends)
                for room, _, _ in _plan(a, rnd):
                    st = c.wait(room, timeout=a.timeout)
                    rep.bytes += st.bytes_done if rnd == 0 else 0
                rep.ends.append(time.time())
            if spy is not None:
                import signal

                spy.send_signal(signal.SIGINT)  # py-spy writes its profile when interrupted
                spy.wait(60)
            rep.ok = True
    except Exception as exc:  # reported to the parent, which prints it
        rep.error = f"{type(exc).__name__}: {exc}"
    q.put(rep)
    barrier.wait()  # keep the pool alive until every rank is done


def _decode(q, barrier, sock, rank, a, bootstrap):
    import torch

    from kvd.client import KvdClient
    from kvd.gpupool import allocate_gpu_pool, cuda_ipc_memory

    rep = Report("decode", rank)
    try:
        lay = _layout("decode", "D", a.decode_tp, rank, a)
        bufs = allocate_gpu_pool(lay)
        for buf in bufs:
            buf.view(torch.int16).fill_(CANARY)
        torch.cuda.synchronize()
        with KvdClient(sock, timeout=60) as c:
            pid = c.register_pool(lay, cuda_ipc_memory(bufs))
            if a.warmup_tokens:  # into room 0's first pages, which room 0 then overwrites
                _, _, dst = _plan(a)[0]
                c.recv(pid, WARMUP_ROOM, bootstrap, "P", dst[:max(1, a.warmup_tokens // a.page_size)],
                       timeout_s=a.timeout)
                c.wait(WARMUP_ROOM, timeout=a.timeout)
            for rnd in range(a.repeat):
                barrier.wait()
                rep.starts.append(time.time())
                for room, _, dst in _plan(a, rnd):
                    c.recv(pid, room, bootstrap, "P", dst, timeout_s=a.timeout)
                for room, _, _ in _plan(a, rnd):
                    c.wait(room, timeout=a.timeout)
                rep.ends.append(time.time())
        touched = torch.zeros(lay.num_tokens, dtype=torch.bool, device="cuda")
        for room, src, dst in _plan(a):
            ps = a.page_size
            offsets = torch.arange(ps, device="cuda")
            src_t = (torch.as_tensor(src, device="cuda")[:, None] * ps + offsets).flatten()
            dst_t = (torch.as_tensor(dst, device="cuda")[:, None] * ps + offsets).flatten()
            touched[dst_t] = True
            for b, buf in enumerate(bufs):
                want = _expected(torch, b, lay.head_range(), src_t, lay.head_dim, "cuda")
                if not torch.equal(buf.view(torch.int16)[dst_t], want):
                    rep.mismatches.append(f"room {room} buffer {b}")
                    break
        for b, buf in enumerate(bufs):
            rest = buf.view(torch.int16)[~touched]
            if rest.numel() and not bool((rest == CANARY).all()):
                rep.mismatches.append(f"buffer {b}: rows outside every room changed")
        rep.bytes = int(touched.sum()) * lay.token_bytes * lay.num_buffers
        rep.ok = not rep.mismatches
    except Exception as exc:
        rep.error = f"{type(exc).__name__}: {exc}"
    q.put(rep)
    barrier.wait()


def _raw_pattern(torch, nbytes: int):
    """A byte pattern with period 251 (prime, so no page or op boundary lines up with it)."""
    period = (torch.arange(251 << 12, device="cuda", dtype=torch.int32) % 251).to(torch.uint8)
    return period.repeat(-(-nbytes // period.numel()))[:nbytes].contiguous()


def _raw_receiver(nbytes: int, q, done) -> None:
    import torch

    from kvd.transport import MooncakeTransport

    t = MooncakeTransport("127.0.0.1", "tcp", "", 4, 4, 1024)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t.register(dst.data_ptr(), nbytes)
    q.put((t.session_id, dst.data_ptr()))
    done.wait()
    q.put(bool(torch.equal(dst, _raw_pattern(torch, nbytes))))
    t.close()


def raw_gpu_write(nbytes: int, reps: int = 3) -> float:
    """GB/s of a Mooncake bulk write of ``nbytes`` GPU -> GPU over TCP to another process, in
    64 MiB ops (best of ``reps``), checked byte for byte: the yardstick of the staged path."""
    import torch

    from kvd.transport import MooncakeTransport

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_raw_receiver, args=(nbytes, q, done))
    proc.start()
    session, dst = q.get(timeout=120)
    t = MooncakeTransport("127.0.0.1", "tcp", "", 4, 4, 1024)
    src = _raw_pattern(torch, nbytes)
    torch.cuda.synchronize()
    t.register(src.data_ptr(), nbytes)
    piece = 64 << 20
    offs = list(range(0, nbytes, piece))
    lens = [min(piece, nbytes - o) for o in offs]
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        t.write_blocking(session, [src.data_ptr() + o for o in offs], [dst + o for o in offs], lens)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    done.set()
    ok = q.get(timeout=120)
    proc.join(30)
    t.close()
    if not ok:
        raise RuntimeError("raw GPU write was not byte-exact")
    return best


def run(a) -> dict:
    from tools.cluster import start_daemon

    tmp = Path(tempfile.mkdtemp(prefix="kvd-gpu-"))
    flags = ["--staging-pool-bytes", a.staging_pool, "--staging-chunk-tokens", str(a.staging_chunk_tokens),
             "--staging-chunk-bytes", a.staging_chunk_bytes, "--timeouts-waiting-s", str(a.timeout),
             "--timeouts-transfer-s", str(a.timeout), "--transfer-workers", str(a.transfer_workers),
             "--staging-prefetch-chunks", str(a.prefetch_chunks)]
    if a.staged:
        flags.insert(0, "--staging-enabled")
    flags += ["--transport-same-node", a.same_node]
    if a.timeline:
        flags += ["--log-level", "debug"]
    flags += a.daemon_flag
    prof = {role: ["--log-profile", str(tmp / f"{role}.prof")] if a.profile else [] for role in ("prefill", "decode")}
    prefill = start_daemon(tmp, "prefill", *flags, *prof["prefill"])
    a.spy = (a.spy_out, prefill.proc.pid) if a.spy_out else None
    decode = start_daemon(tmp, "decode", *flags, *prof["decode"])
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        barrier = ctx.Barrier(a.prefill_tp + a.decode_tp)
        send_barrier = ctx.Barrier(a.prefill_tp)
        procs = [ctx.Process(target=_prefill, args=(q, barrier, prefill.socket_path, r, a, prefill.address,
                                                     send_barrier))
                 for r in range(a.prefill_tp)]
        procs += [ctx.Process(target=_decode, args=(q, barrier, decode.socket_path, r, a, prefill.address))
                  for r in range(a.decode_tp)]
        for p in procs:
            p.start()
        reports = [q.get(timeout=a.timeout + 120) for _ in procs]
        for p in procs:
            p.join(60)
        dstat, pstat = decode.status()["daemon"], prefill.status()["daemon"]
    finally:
        prefill.stop()
        decode.stop()
    if a.profile:
        _print_profiles(tmp, a.profile)
    peer_paths, totals = _peer_paths(prefill.log())
    dec = [r for r in reports if r.role == "decode"]
    nbytes = sum(r.bytes for r in dec)
    rounds = []
    # A rank that failed (its error is reported) has fewer rounds: only complete rounds count.
    done = min([len(r.ends) for r in reports] + [len(r.sends) for r in reports if r.role == "prefill"])
    for rnd in range(done):
        end = max(r.ends[rnd] for r in reports)
        rounds.append({"seconds": end - min(r.starts[rnd] for r in reports),
                       # KV ready at prefill (every room bootstrapped) -> every engine told the room ended.
                       "transfer_seconds": end - max(r.sends[rnd] for r in reports if r.role == "prefill"),
                       "send_at_ms": (max(r.sends[rnd] for r in reports if r.role == "prefill")
                                      - min(r.starts[rnd] for r in reports)) * 1e3})
    # The median round (by transfer time) stands for the run; every round is printed.
    mid = sorted(rounds, key=lambda x: x["transfer_seconds"])[(len(rounds) - 1) // 2] if rounds else \
        {"seconds": 0.0, "transfer_seconds": 0.0, "send_at_ms": 0.0}
    seconds, xfer = mid["seconds"], mid["transfer_seconds"]
    timeline = (_timeline({"P": prefill.log(), "D": decode.log()}, min(r.starts[0] for r in reports))
                if a.timeline and all(r.starts for r in reports) else [])
    kern = {"gather_s": pstat["staging"]["kernel_seconds"].get("gather", 0.0),
            "scatter_s": dstat["staging"]["kernel_seconds"].get("scatter", 0.0)}
    return {"ok": all(r.ok for r in reports), "bytes": nbytes, "seconds": seconds,
            "gbps": nbytes / seconds / 1e9 if seconds > 0 else 0.0, "transfer_seconds": xfer,
            "transfer_gbps": nbytes / xfer / 1e9 if xfer > 0 else 0.0,
            "send_at_ms": mid["send_at_ms"], "rounds": rounds, "paths": dstat["rooms_by_path"],
            "write_ops": pstat["write_ops_total"], "errors": {**pstat["errors"], **dstat["errors"]},
            "failures": [(r.role, r.rank, r.error, r.mismatches[:2]) for r in reports if not r.ok],
            "peer_paths": peer_paths, "path_totals": totals, "timeline": timeline, **kern}


def _print_profiles(tmp: Path, top: int) -> None:
    """Each daemon's event-loop thread, by own time (cProfile, whole run: warm-up included)."""
    import io
    import pstats

    for role in ("prefill", "decode"):
        path = tmp / f"{role}.prof"
        if not path.exists():
            print(f"  no profile from the {role} daemon")
            continue
        out = io.StringIO()
        pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(top)
        print(f"--- {role} daemon, event-loop thread, top {top} by own time ---")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


def _timeline(logs: dict[str, str], t0: float) -> list[str]:
    """The timed rooms' debug events of both daemons, in ms from the engines' start (issue 14:
    where a room's time goes beside the copy)."""
    import json
    from datetime import datetime

    rows = []
    for who, text in logs.items():
        for line in text.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("room") in (None, WARMUP_ROOM) or "timestamp" not in ev:
                continue
            t = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            rest = {k: v for k, v in ev.items() if k not in ("timestamp", "event", "level", "logger", "room")}
            rows.append((t, f"{(t - t0) * 1e3:9.2f} ms {who} {ev.get('event')} {rest}"))
    return [text for _, text in sorted(rows)]


def _peer_paths(log_text: str) -> tuple[list[str], dict]:
    """The prefill daemon's peer_path and same_node_fallback events (which path each peer got, and
    why), and the per-peer totals it logs at stop (bytes and seconds of its same-node copies)."""
    import json

    out, totals = [], {}
    for line in log_text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") in ("peer_path", "same_node_fallback"):
            out.append(f"{ev['event']}: {ev.get('path')} ({ev.get('reason')})")
        elif ev.get("event") == "same_node_totals":
            for peer, p in (ev.get("peers") or {}).items():
                totals[peer] = p
    return out, totals


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill-tp", type=int, default=4)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=131072, help="tokens per room")
    ap.add_argument("--rooms", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed rounds of the same rooms (new room ids); the median round is reported")
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per engine chunk (chunked prefill)")
    ap.add_argument("--blocking-sends", action="store_true",
                    help="each chunk waits for the daemon's reply (default: send(wait=False), no round trip)")
    ap.add_argument("--staging-pool", default="4GiB")
    ap.add_argument("--staging-chunk-tokens", type=int, default=8192)
    ap.add_argument("--staging-chunk-bytes", default="256MiB")
    ap.add_argument("--transfer-workers", type=int, default=8,
                    help="daemon transfer.workers (writes in flight per dispatch queue: workers // queues)")
    ap.add_argument("--prefetch-chunks", type=int, default=2, help="staging regions a room may hold at once")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--no-staging", dest="staged", action="store_false")
    ap.add_argument("--raw", action="store_true", help="also time a raw GPU->GPU Mooncake bulk write")
    ap.add_argument("--warmup-tokens", type=int, default=0,
                    help="tokens of one untimed room before the timed ones (Triton JIT, first handshakes)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="run both daemons' event loops under cProfile and print each one's top N functions")
    ap.add_argument("--daemon-flag", action="append", default=[],
                    help="extra flag for both daemons (repeatable), e.g. --daemon-flag=--no-transport-one-pass")
    ap.add_argument("--spy-out", default="", metavar="FILE",
                    help="py-spy the prefill daemon during the timed rounds into FILE (raw stacks)")
    ap.add_argument("--spy-bin", default="py-spy")
    ap.add_argument("--spy-gil", action="store_true", help="sample only the thread holding the GIL")
    ap.add_argument("--timeline", action="store_true",
                    help="daemons at debug level; print the timed rooms' events in ms from the engines' start")
    ap.add_argument("--same-node", default="cuda_ipc", choices=("cuda_ipc", "off"),
                    help="the daemons' transport.same_node ('off': every peer over the network, TCP here)")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    a.num_pages = a.rooms * a.tokens // a.page_size + 64  # 64 pages no room touches (canary-checked)
    r = run(a)
    print(f"GPU e2e TP {a.prefill_tp}->{a.decode_tp}, {a.layers} layers, {a.kv_heads} kv heads, head_dim "
          f"{a.head_dim}, bf16, {a.rooms} room(s) x {a.tokens} tokens, paths {r['paths']}")
    print(f"  byte-exact: {r['ok']}  {r['bytes'] / 2**30:.2f} GiB; room (bootstrap included) {r['seconds'] * 1e3:.1f} ms "
          f"= {r['gbps']:.2f} GB/s; transfer (KV ready -> engines told) {r['transfer_seconds'] * 1e3:.1f} ms = "
          f"{r['transfer_gbps']:.2f} GB/s; {r['write_ops']} write ops, errors {r['errors']}")
    if r["failures"]:
        print("  failures:", r["failures"])
    for line in r["peer_paths"]:
        print("  " + line)
    for peer, p in r["path_totals"].items():
        print(f"  same-node totals to {peer[:24]}: batches {p['batches']}, seconds {p['seconds']}")
    if len(r["rounds"]) > 1:
        print("  rounds (transfer ms / room ms): " + ", ".join(
            f"{x['transfer_seconds'] * 1e3:.1f}/{x['seconds'] * 1e3:.1f}" for x in r["rounds"]) + " (median printed above)")
    if r["timeline"]:
        print(f"  (prefill ranks saw every room bootstrapped and sent from {r['send_at_ms']:.2f} ms)")
    for line in r["timeline"][:200]:
        print("  " + line)
    kernel = r["gather_s"] + r["scatter_s"]
    if a.raw:
        raw = raw_gpu_write(min(r["bytes"], 4 << 30))
        print(f"  raw Mooncake GPU->GPU bulk write: {raw:.2f} GB/s; staged/raw = {r['gbps'] / raw:.2f}")
        if kernel > 0:
            exposed = max(0.0, r["seconds"] - r["bytes"] / (raw * 1e9))
            hidden = max(0.0, 1 - exposed / kernel)
            print(f"  kernels: gather {r['gather_s']:.3f} s + scatter {r['scatter_s']:.3f} s; time beyond the raw "
                  f"write {exposed:.3f} s -> at least {hidden:.0%} of kernel time hidden by overlap")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
