"""Two GPUs of one host (issue 16): prefill engine ranks on one GPU, decode engine ranks on the other.

Each side has its own kvd daemon; the daemons use the same-node path (``transport.same_node =
"cuda_ipc"``), so the bytes go GPU 0 -> GPU 1 over the devices' link (NVLink on the H200 pair).
Engine ranks are processes (several share a GPU where there are more ranks than GPUs); their
pools are CUDA tensors handed to kvd as CUDA IPC handles, and every byte the decode ranks hold
is checked on the GPU (the pattern of tools/gpu_e2e.py: a function of buffer, global head,
source token and element; rows outside every room keep a canary).

In one run it prints:

- the ceiling: a plain peer-to-peer ``copy_`` GPU 0 -> GPU 1 of the same bytes (torch);
- kvd same-TP / ceiling (goal >= 0.9) and hetero-TP / ceiling (TP 4->1, 1->4, with GQA: goal
  >= 0.8), 128k-token contexts, byte-exact;
- Mooncake TCP on the same pair (a raw bulk write GPU 0 -> GPU 1 into another process, and kvd's
  network path), for comparison.

Each timed room follows a warm-up room through the same daemons and ranks (peer paths decided,
CUDA IPC handles opened), as in a serving engine whose peers are already known
(``--no-warmup`` times the first room instead).

``--peer-access on`` starts the daemons with a shim (a ``sitecustomize`` in a temporary folder)
that enables CUDA peer access between every pair of GPUs when kvd's driver wrapper starts: a
diagnostic of what that change in ``kvd/transfer/cudaipc.py`` would give, never kvd's own figure.
``auto`` (the default) reruns with it only the same-node cases that failed or missed their goal.

    python3 tools/gpu_two.py                       # everything above, GPU 0 -> GPU 1
    python3 tools/gpu_two.py --cases "same TP 1->1" --tokens 8192
    python3 tools/gpu_two.py --decode-device 0     # one-GPU dry run: both sides on GPU 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.gpu_e2e import CANARY, Report, _expected, _layout, _peer_paths, _raw_pattern  # noqa: E402

GiB = 1 << 30


@dataclass(frozen=True)
class Case:
    name: str
    prefill_tp: int
    decode_tp: int
    kv_heads: int
    same_node: str = "cuda_ipc"  # or "off": the network path (TCP here)
    goal: float = 0.0  # kvd / ceiling wanted (0: comparison only)
    tokens: int = 0  # 0: --tokens
    one_pass: bool = True  # False: hetero rooms stage (gather on GPU 0, write, scatter on GPU 1)


CASES = [
    Case("same TP 1->1", 1, 1, 8, goal=0.9),
    Case("same TP 2->2", 2, 2, 8, goal=0.9),
    Case("TP 4->1", 4, 1, 8, goal=0.8),
    Case("TP 1->4", 1, 4, 8, goal=0.8),
    Case("GQA 4->1 (2 kv heads)", 4, 1, 2, goal=0.8),
    Case("GQA 1->4 (2 kv heads)", 1, 4, 2, goal=0.8),
    Case("TP 4->1 staged (one pass off)", 4, 1, 8, one_pass=False),
    Case("network (TCP) TP 4->1", 4, 1, 8, same_node="off", tokens=32768),
]
DEFAULT_CASES = ["same TP 1->1", "TP 4->1", "TP 1->4", "GQA 4->1 (2 kv heads)", "GQA 1->4 (2 kv heads)",
                 "TP 4->1 staged (one pass off)", "network (TCP) TP 4->1"]

# Device-only shim for --peer-access on: chain any other sitecustomize on the path first (the GPU
# host's own workarounds), then make kvd's driver wrapper enable peer access between all GPUs.
SHIM = '''
import ctypes, os, sys
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(_d or ".", "sitecustomize.py")
    if os.path.abspath(_d or ".") != _here and os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, "exec"), {"__name__": "sitecustomize_chained", "__file__": _f})
        break
if os.environ.get("KVD_TWO_PEER_ACCESS") == "1":
    try:
        from kvd.transfer import cudaipc as _ci

        _orig = _ci.Cuda.__init__

        def _init(self):
            _orig(self)
            done = []
            for i in range(self.device_count):
                for j in range(self.device_count):
                    if i == j:
                        continue
                    can = ctypes.c_int()
                    di, dj = ctypes.c_int(), ctypes.c_int()
                    self.lib.cuDeviceGet(ctypes.byref(di), i)
                    self.lib.cuDeviceGet(ctypes.byref(dj), j)
                    self.lib.cuDeviceCanAccessPeer(ctypes.byref(can), di, dj)
                    if not can.value:
                        continue
                    self.use(j)
                    self.use(i)
                    rc = self.lib.cuCtxEnablePeerAccess(self._ctx[j], 0)
                    done.append((i, j, rc))  # 0 ok, 704 already enabled
            print(f"kvd-two shim: cuCtxEnablePeerAccess {done}", file=sys.stderr, flush=True)

        _ci.Cuda.__init__ = _init
    except Exception as exc:
        print(f"kvd-two shim failed: {exc!r}", file=sys.stderr, flush=True)
'''


# --- engine ranks ---------------------------------------------------------------------------
def _rooms(a) -> list[tuple[str, int, list[int], list[int]]]:
    """(kind, room, source pages, destination pages): the optional warm-up room, then the timed one.
    Destination pages run from the end of the pool, so its first 64 pages stay untouched."""
    ps, n = a.page_size, a.num_pages
    tp = a.tokens // ps
    wp = a.warm_tokens // ps if a.warmup else 0
    out = []
    if wp:
        out.append(("warm", 2000 + a.seq, list(range(wp)), list(range(n - wp, n))))
    out.append(("timed", 1000 + a.seq, list(range(tp)), list(range(n - wp - tp, n - wp))))
    return out


def _wait_barrier(barrier, rep: Report, timeout: float) -> bool:
    try:
        barrier.wait(timeout=timeout)
        return True
    except Exception as exc:  # BrokenBarrierError: another rank failed or timed out
        rep.error = rep.error or f"barrier: {type(exc).__name__}"
        return False


def _prefill_rank(q, barrier, sock, rank, a, bootstrap, device) -> None:
    import torch

    from kvd.client import KvdClient
    from kvd.gpupool import allocate_gpu_pool, cuda_ipc_memory

    torch.cuda.set_device(device)
    rep = Report("prefill", rank)
    bufs: list[Any] = []
    client = None
    try:
        lay = _layout("prefill", "P", a.prefill_tp, rank, a)
        bufs = allocate_gpu_pool(lay)
        tokens = torch.arange(lay.num_tokens, device="cuda")
        for b, buf in enumerate(bufs):
            buf.view(torch.int16).copy_(_expected(torch, b, lay.head_range(), tokens, lay.head_dim, "cuda"))
        del tokens
        torch.cuda.synchronize()
        client = KvdClient(sock, timeout=60)
        pid = client.register_pool(lay, cuda_ipc_memory(bufs), bootstrap=bootstrap)
    except Exception as exc:
        rep.error = f"setup: {type(exc).__name__}: {exc}"
        barrier.abort()  # the other ranks stop waiting for this one
    chunk = max(1, a.chunk_tokens // a.page_size)
    if _wait_barrier(barrier, rep, a.timeout) and not rep.error:
        for kind, room, src, _ in _rooms(a):
            if kind == "timed" and not _wait_barrier(barrier, rep, a.timeout):
                break
            try:
                t0 = time.time()
                for i in range(0, len(src), chunk):
                    last = i + chunk >= len(src)
                    client.send(pid, room, src[i:i + chunk], last, aux=b"aux" if last else b"", wait=False)
                st = client.wait(room, timeout=a.timeout)
                if kind == "timed":
                    rep.t_start, rep.t_end, rep.bytes = t0, time.time(), st.bytes_done
            except Exception as exc:
                rep.error = f"{kind} room: {type(exc).__name__}: {exc}"
                barrier.abort()
                break
        rep.ok = not rep.error
    q.put(rep)
    _wait_barrier(barrier, Report("prefill", rank), a.timeout)  # keep the pool alive until all are done
    if client is not None:
        client.close()


def _decode_rank(q, barrier, sock, rank, a, bootstrap, device) -> None:
    import torch

    from kvd.client import KvdClient
    from kvd.gpupool import allocate_gpu_pool, cuda_ipc_memory

    torch.cuda.set_device(device)
    rep = Report("decode", rank)
    bufs: list[Any] = []
    client = None
    lay = None
    try:
        lay = _layout("decode", "D", a.decode_tp, rank, a)
        bufs = allocate_gpu_pool(lay)
        for buf in bufs:
            buf.view(torch.int16).fill_(CANARY)
        torch.cuda.synchronize()
        client = KvdClient(sock, timeout=60)
        pid = client.register_pool(lay, cuda_ipc_memory(bufs))
    except Exception as exc:
        rep.error = f"setup: {type(exc).__name__}: {exc}"
        barrier.abort()
    rooms = _rooms(a)
    if _wait_barrier(barrier, rep, a.timeout) and not rep.error:
        for kind, room, _, dst in rooms:
            if kind == "timed" and not _wait_barrier(barrier, rep, a.timeout):
                break
            try:
                t0 = time.time()
                client.recv(pid, room, bootstrap, "P", dst, timeout_s=a.timeout)
                client.wait(room, timeout=a.timeout)
                if kind == "timed":
                    rep.t_start, rep.t_end = t0, time.time()
            except Exception as exc:
                rep.error = f"{kind} room: {type(exc).__name__}: {exc}"
                barrier.abort()
                break
    if not rep.error and lay is not None:
        try:
            _check(torch, bufs, lay, rooms, a, rep)
        except Exception as exc:
            rep.error = f"check: {type(exc).__name__}: {exc}"
    rep.ok = not rep.error and not rep.mismatches
    q.put(rep)
    _wait_barrier(barrier, Report("decode", rank), a.timeout)
    if client is not None:
        client.close()


def _check(torch, bufs, lay, rooms, a, rep: Report) -> None:
    """Every row of every room holds its source row's pattern; every other row keeps the canary."""
    ps = a.page_size
    offs = torch.arange(ps, device="cuda")
    touched = torch.zeros(lay.num_tokens, dtype=torch.bool, device="cuda")
    for kind, room, src, dst in rooms:
        src_t = (torch.tensor(src, device="cuda")[:, None] * ps + offs).reshape(-1)
        dst_t = (torch.tensor(dst, device="cuda")[:, None] * ps + offs).reshape(-1)
        touched[dst_t] = True
        for b, buf in enumerate(bufs):
            want = _expected(torch, b, lay.head_range(), src_t, lay.head_dim, "cuda")
            if not torch.equal(buf.view(torch.int16)[dst_t], want):
                rep.mismatches.append(f"{kind} room {room} buffer {b}")
                break
        if kind == "timed":
            rep.bytes = int(dst_t.numel()) * lay.token_bytes * lay.num_buffers
    for b, buf in enumerate(bufs):
        rest = buf.view(torch.int16)[~touched]
        if rest.numel() and not bool((rest == CANARY).all()):
            rep.mismatches.append(f"buffer {b}: rows outside every room changed")


# --- one case through two daemons -----------------------------------------------------------
def case_args(a, case: Case, seq: int) -> argparse.Namespace:
    c = argparse.Namespace(**vars(a))
    c.prefill_tp, c.decode_tp, c.kv_heads = case.prefill_tp, case.decode_tp, case.kv_heads
    c.tokens = case.tokens or a.tokens
    c.warm_tokens = min(a.warm_tokens, c.tokens)
    c.same_node, c.seq = case.same_node, seq
    warm_pages = c.warm_tokens // c.page_size if c.warmup else 0
    c.num_pages = c.tokens // c.page_size + warm_pages + 64  # 64 pages no room touches (canary-checked)
    return c


def decode_bytes(a, case: Case) -> int:
    """Bytes the decode ranks receive for one timed room (replicated heads counted per rank)."""
    c = case_args(a, case, 0)
    return sum(_layout("decode", "D", c.decode_tp, r, c).token_bytes for r in range(c.decode_tp)) \
        * c.layers * 2 * c.tokens


def _log_problems(text: str, limit: int = 6) -> list[str]:
    out = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            if "Error" in line or "error" in line or "shim" in line:
                out.append(line.strip()[:300])
            continue
        if ev.get("level") in ("error", "warning", "critical"):
            keep = {k: v for k, v in ev.items() if k not in ("timestamp", "logger", "level")}
            out.append(json.dumps(keep, default=str)[:400])
    return out[:limit]


def run_case(a, case: Case, seq: int, peer_access: bool) -> dict[str, Any]:
    from tools.cluster import start_daemon

    c = case_args(a, case, seq)
    tmp = Path(tempfile.mkdtemp(prefix="kvd-two-"))
    flags = ["--staging-enabled", "--staging-pool-bytes", a.staging_pool, "--staging-chunk-tokens",
             str(a.staging_chunk_tokens), "--staging-chunk-bytes", a.staging_chunk_bytes,
             "--timeouts-waiting-s", str(a.timeout), "--timeouts-transfer-s", str(a.timeout),
             "--transfer-workers", str(a.transfer_workers), "--staging-prefetch-chunks", str(a.prefetch_chunks),
             "--transport-same-node", case.same_node]
    if not case.one_pass:
        flags.append("--no-transport-one-pass")
    env: dict[str, str] = {}
    if peer_access:
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)
        env = {"KVD_TWO_PEER_ACCESS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(shim), str(ROOT), os.environ.get("PYTHONPATH", ""))
                                             if p)}
    out: dict[str, Any] = {"case": case.name, "peer_access_shim": peer_access, "tokens": c.tokens,
                           "prefill_tp": c.prefill_tp, "decode_tp": c.decode_tp, "kv_heads": c.kv_heads,
                           "same_node": case.same_node, "ok": False}
    t_case = time.monotonic()
    prefill = decode = None
    procs: list[Any] = []
    try:
        prefill = start_daemon(tmp, "prefill", *flags, env=env)
        decode = start_daemon(tmp, "decode", *flags, env=env)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        barrier = ctx.Barrier(c.prefill_tp + c.decode_tp)
        procs = [ctx.Process(target=_prefill_rank, args=(q, barrier, prefill.socket_path, r, c, prefill.address,
                                                         a.prefill_device)) for r in range(c.prefill_tp)]
        procs += [ctx.Process(target=_decode_rank, args=(q, barrier, decode.socket_path, r, c, prefill.address,
                                                        a.decode_device)) for r in range(c.decode_tp)]
        for p in procs:
            p.start()
        reports: list[Report] = []
        deadline = time.monotonic() + 2 * c.timeout + 90  # setup, warm-up room, timed room, check
        while len(reports) < len(procs) and time.monotonic() < deadline:
            try:
                reports.append(q.get(timeout=5))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(30 if len(reports) == len(procs) else 2)
        try:
            dstat, pstat = decode.status()["daemon"], prefill.status()["daemon"]
        except Exception as exc:
            dstat = pstat = {}
            out["status_error"] = f"{type(exc).__name__}: {exc}"
        plog, dlog = prefill.log(), decode.log()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for d in (prefill, decode):
            if d is not None:
                d.stop()
    dec = [r for r in reports if r.role == "decode"]
    timed = [r for r in reports if r.t_end > 0]
    out["bytes"] = sum(r.bytes for r in dec)
    out["seconds"] = max(r.t_end for r in timed) - min(r.t_start for r in timed) if timed else 0.0
    out["gbps"] = out["bytes"] / out["seconds"] / 1e9 if out["seconds"] > 0 else 0.0
    out["ok"] = len(reports) == len(procs) and all(r.ok for r in reports)
    out["missing_reports"] = len(procs) - len(reports)
    out["failures"] = [(r.role, r.rank, r.error[:400], r.mismatches[:2]) for r in reports if not r.ok]
    out["paths"] = dstat.get("rooms_by_path", {})
    out["write_ops"] = pstat.get("write_ops_total")
    out["errors"] = {**pstat.get("errors", {}), **dstat.get("errors", {})}
    out["gather_s"] = pstat.get("staging", {}).get("kernel_seconds", {}).get("gather", 0.0)
    out["scatter_s"] = dstat.get("staging", {}).get("kernel_seconds", {}).get("scatter", 0.0)
    out["peer_paths"] = _peer_paths(plog)[:4]
    if peer_access:
        out["shim"] = [ln[:300] for ln in (plog + dlog).splitlines() if "kvd-two shim" in ln][:2]
    if not out["ok"]:
        out["prefill_log"] = _log_problems(plog)
        out["decode_log"] = _log_problems(dlog)
    out["case_s"] = time.monotonic() - t_case
    return out


# --- yardsticks -----------------------------------------------------------------------------
def _sync_all(torch) -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def p2p_copy(nbytes: int, src_dev: int, dst_dev: int, reps: int = 5, pieces: int = 64) -> dict[str, Any]:
    """torch ``copy_`` of ``nbytes`` from ``cuda:src_dev`` to ``cuda:dst_dev``: one copy of all the bytes
    and ``pieces`` copies of a buffer each (the pool's shape), median of ``reps``, checked."""
    import torch

    buf = {"src": _raw_pattern_on(torch, nbytes, src_dev)}
    buf["dst"] = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    buf["dst"].copy_(buf["src"])  # warm-up (torch enables peer access here where the GPUs allow it)
    _sync_all(torch)

    def timed(fn) -> float:
        times = []
        for _ in range(reps):
            _sync_all(torch)
            t0 = time.perf_counter()
            fn()
            _sync_all(torch)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def whole_copy() -> None:
        buf["dst"].copy_(buf["src"])

    step = -(-nbytes // pieces)

    def piecewise() -> None:
        for o in range(0, nbytes, step):
            buf["dst"][o:o + step].copy_(buf["src"][o:o + step])

    whole = timed(whole_copy)
    split = timed(piecewise)
    exact = all(torch.equal(buf["dst"][o:o + GiB], buf["src"][o:o + GiB].to(f"cuda:{dst_dev}"))
                for o in range(0, nbytes, GiB))
    out = {"bytes": nbytes, "gbps": nbytes / whole / 1e9, "gbps_pieces": nbytes / split / 1e9, "pieces": pieces,
           "exact": exact, "can_access_peer": torch.cuda.can_device_access_peer(src_dev, dst_dev)
           if src_dev != dst_dev else True}
    buf.clear()
    torch.cuda.empty_cache()
    return out


def _raw_pattern_on(torch, nbytes: int, device: int):
    with torch.cuda.device(device):
        return _raw_pattern(torch, nbytes)


def _tcp_receiver(nbytes: int, device: int, q, done) -> None:
    import torch

    from kvd.transport import MooncakeTransport

    torch.cuda.set_device(device)
    t = MooncakeTransport("127.0.0.1", "tcp", "", 4, 4, 1024)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t.register(dst.data_ptr(), nbytes)
    q.put((t.session_id, dst.data_ptr()))
    done.wait()
    q.put(bool(torch.equal(dst, _raw_pattern(torch, nbytes))))
    t.close()


def tcp_raw(nbytes: int, src_dev: int, dst_dev: int, reps: int = 2) -> dict[str, Any]:
    """Mooncake TCP bulk write (64 MiB ops) from ``cuda:src_dev`` here into ``cuda:dst_dev`` of
    another process, best of ``reps``, checked byte for byte."""
    import torch

    from kvd.transport import MooncakeTransport

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_tcp_receiver, args=(nbytes, dst_dev, q, done))
    proc.start()
    try:
        session, dst = q.get(timeout=120)
        t = MooncakeTransport("127.0.0.1", "tcp", "", 4, 4, 1024)
        src = _raw_pattern_on(torch, nbytes, src_dev)
        torch.cuda.synchronize(src_dev)
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
        t.close()
        return {"bytes": nbytes, "gbps": best, "exact": ok}
    finally:
        done.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def probe() -> dict[str, Any]:
    import torch

    n = torch.cuda.device_count()
    out: dict[str, Any] = {"device_count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)],
                           "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                                   "NVSHMEM_DISABLE_NVLS")}}
    if n >= 2:
        out["can_access_peer"] = {f"{i}->{j}": torch.cuda.can_device_access_peer(i, j)
                                  for i in range(n) for j in range(n) if i != j}
    try:
        r = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        out["topo"] = r.stdout.strip()
        r = subprocess.run(["nvidia-smi", "nvlink", "-s", "-i", "0"], capture_output=True, text=True, timeout=30)
        out["nvlink_gpu0"] = r.stdout.strip()[:1500]
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["topo"] = f"nvidia-smi: {exc}"
    return out


# --- report ---------------------------------------------------------------------------------
def line_for(r: dict[str, Any], ceiling: dict[int, dict[str, Any]], tcp: dict[str, Any] | None) -> str:
    tag = " [peer-access shim]" if r["peer_access_shim"] else ""
    head = f"  {r['case'] + tag:<44}"
    if "error" in r:
        return head + f" FAILED to run: {r['error'][:600]}"
    s = (f"{head} exact {r['ok']}  {r['bytes'] / GiB:6.2f} GiB {r['seconds']:7.3f} s {r['gbps']:7.1f} GB/s "
         f"paths {r['paths']} ops {r['write_ops']}")
    ceil = ceiling.get(r["bytes"])
    if r["same_node"] != "off" and ceil and r["bytes"]:
        s += f" -> kvd/ceiling {r['gbps'] / ceil['gbps']:.3f}"
        if r.get("goal"):
            s += f" (goal {r['goal']})"
    if r["same_node"] == "off" and tcp and tcp.get("gbps"):
        s += f" -> kvd TCP / raw Mooncake TCP {r['gbps'] / tcp['gbps']:.3f}"
    if r.get("gather_s") or r.get("scatter_s"):
        s += f"; kernel busy gather {r['gather_s']:.3f} s (GPU {r['prefill_device']}), scatter {r['scatter_s']:.3f} s " \
             f"(GPU {r['decode_device']})"
    if r["errors"]:
        s += f"; errors {r['errors']}"
    return s


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill-device", type=int, default=0, help="GPU of every prefill engine rank")
    ap.add_argument("--decode-device", type=int, default=1, help="GPU of every decode engine rank")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma-separated case names, or 'all'; known: {[c.name for c in CASES]}")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=131072, help="tokens of the timed room")
    ap.add_argument("--warm-tokens", type=int, default=8192, help="tokens of the warm-up room")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per engine chunk (chunked prefill)")
    ap.add_argument("--staging-pool", default="4GiB")
    ap.add_argument("--staging-chunk-tokens", type=int, default=8192)
    ap.add_argument("--staging-chunk-bytes", default="256MiB")
    ap.add_argument("--transfer-workers", type=int, default=8)
    ap.add_argument("--prefetch-chunks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a room may take")
    ap.add_argument("--peer-access", default="auto", choices=("off", "on", "auto"),
                    help="diagnostic shim enabling CUDA peer access in the daemons (see the module doc)")
    ap.add_argument("--tcp-bytes", default=str(4 * GiB), help="bytes of the raw Mooncake TCP write (0: skip)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no new case after this many seconds")
    ap.add_argument("--out", default="", help="folder for results.json and summary.txt")
    return ap


def _select(spec: str) -> list[Case]:
    if spec == "all":
        return list(CASES)
    known = {c.name: c for c in CASES}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(known)}")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    a.kv_heads = 8  # set per case
    import torch

    t0 = time.monotonic()
    cases = _select(a.cases)
    outdir = Path(a.out) if a.out else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv}
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)
        if outdir:
            (outdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
            (outdir / "summary.txt").write_text("\n".join(lines) + "\n")

    if not torch.cuda.is_available():
        print("gpu_two: no CUDA device here; nothing to measure.")
        return 0
    need = max(a.prefill_device, a.decode_device) + 1
    results["probe"] = pr = probe()
    if pr["device_count"] < need:
        say(f"gpu_two: needs {need} GPUs (--prefill-device {a.prefill_device} --decode-device "
            f"{a.decode_device}), this host has {pr['device_count']}")
        return 2
    say(f"devices: {pr['names']}; peer access {pr.get('can_access_peer')}; multicast env {pr['env']}")
    say("topology (nvidia-smi topo -m):\n" + str(pr.get("topo")))
    if pr.get("nvlink_gpu0"):
        say("nvidia-smi nvlink -s -i 0:\n" + pr["nvlink_gpu0"][:800])
    say(f"prefill ranks on GPU {a.prefill_device}, decode ranks on GPU {a.decode_device}; {a.layers} layers, "
        f"hd {a.head_dim}, bf16, page {a.page_size}, timed room {a.tokens} tokens"
        + (f" after a {a.warm_tokens}-token warm-up room" if a.warmup else " (cold: no warm-up room)"))

    # the ceiling, per distinct byte count of the same-node cases
    ceiling: dict[int, dict[str, Any]] = {}
    for case in cases:
        if case.same_node == "off":
            continue
        nb = decode_bytes(a, case)
        if nb not in ceiling:
            ceiling[nb] = p2p_copy(nb, a.prefill_device, a.decode_device)
            c = ceiling[nb]
            say(f"ceiling: torch copy_ GPU {a.prefill_device} -> GPU {a.decode_device}, {nb / GiB:.2f} GiB: "
                f"{c['gbps']:.1f} GB/s one copy, {c['gbps_pieces']:.1f} GB/s as {c['pieces']} copies; "
                f"exact {c['exact']}; peer access {c['can_access_peer']}")
    results["ceiling"] = {str(k): v for k, v in ceiling.items()}

    tcp = None
    tcp_bytes = int(a.tcp_bytes)
    if tcp_bytes:
        try:
            tcp = tcp_raw(tcp_bytes, a.prefill_device, a.decode_device)
            ref = next(iter(ceiling.values()), None)
            say(f"raw Mooncake TCP GPU {a.prefill_device} -> GPU {a.decode_device} (another process), "
                f"{tcp_bytes / GiB:.2f} GiB in 64 MiB ops: {tcp['gbps']:.2f} GB/s, exact {tcp['exact']}"
                + (f"; / ceiling {tcp['gbps'] / ref['gbps']:.4f}" if ref else ""))
        except Exception as exc:
            tcp = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"raw Mooncake TCP failed: {tcp['error']}")
        results["tcp_raw"] = tcp

    results["cases"] = []
    seq = 0

    def one(case: Case, shim: bool) -> dict[str, Any] | None:
        nonlocal seq
        if a.budget_s and time.monotonic() - t0 > a.budget_s:
            say(f"  {case.name}{' [peer-access shim]' if shim else ''}: skipped (--budget-s {a.budget_s} spent)")
            return None
        seq += 1
        r = run_case(a, case, seq, shim)
        r.update(goal=case.goal, prefill_device=a.prefill_device, decode_device=a.decode_device)
        results["cases"].append(r)
        say(line_for(r, ceiling, tcp))
        for p in r.get("shim", []):
            say("      " + p)
        for p in r.get("peer_paths", [])[:2]:
            say("      " + str(p)[:300])
        if r.get("failures"):
            say(f"      failures: {r['failures']}"[:1200])
        for side in ("prefill_log", "decode_log"):
            for ln in r.get(side, []):
                say(f"      {side}: {ln}")
        return r

    say("kvd, two daemons:")
    missed = []
    for case in cases:
        r = one(case, a.peer_access == "on")
        if r is None or case.same_node == "off" or a.peer_access != "auto":
            continue
        ceil = ceiling.get(r.get("bytes", -1))
        if not r["ok"] or (ceil and r["gbps"] / ceil["gbps"] < case.goal):
            missed.append(case)
    if missed:
        say("same cases again with the diagnostic peer-access shim (not kvd's own figures):")
        for case in missed:
            one(case, True)

    say("=== summary (ratios within this run) ===")
    for r in results["cases"]:
        say(line_for(r, ceiling, tcp))
    ok = all(r["ok"] for r in results["cases"] if not r["peer_access_shim"])
    say(f"all kvd cases byte-exact: {ok}; {time.monotonic() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

