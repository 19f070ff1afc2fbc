"""kvd's SGLang backend on a GPU: SGLang 0.5.23's own classes over CUDA KV pools, two real daemons.

Each engine rank is its own process, built the way SGLang's schedulers build one: a KV pool of
per-layer CUDA tensors (MHATokenToKVPool: ``k_buffer[l]``/``v_buffer[l]`` of
``[tokens + page_size, heads, head_dim]``; MLA: one ``kv_buffer[l]`` per layer), SGLang's
``MetadataBuffers`` for the aux rows, and a real ``KVArgs`` whose ``kv_data_ptrs`` /
``kv_data_lens`` / ``kv_item_lens`` / ``aux_*`` are the raw pointers SGLang hands a backend.
Classes come from SGLang's ``get_kv_class`` after kvd's plug-in registered ``kvd``; the bootstrap
server is kvd's (SGLang's ``CommonKVBootstrapServer``). kvd resolves each CUDA pointer to its
allocation and exports it by CUDA IPC (kvd/engineclient/rawmem.py). Prefill ranks send each
room in chunks in the scheduler's order; decode ranks check every byte of KV on the GPU
(a function of buffer, global head, source token and element), that rows outside every room
kept their canary, and that the aux rows arrived byte for byte before Success.

    python3 tools/gpu_sglang.py --prefill-tp 2 --decode-tp 1            # GQA, bf16
    python3 tools/gpu_sglang.py --mla --prefill-tp 2 --decode-tp 1      # MLA

``python3 tools/gpu_sglang.py bundle DIR`` (on a machine with package access) gathers what a
GPU host without SGLang needs: SGLang 0.5.23's Python files as ``DIR/sglang-0.5.23-purepy.zip``
(its compiled extensions are cp311-only and are not imported by these classes) and cp312 wheels
of the packages its disaggregation modules import. notes/sglang-gpu.md gives the device command.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CANARY = 0x1357
# What SGLang 0.5.23's disaggregation classes import that the GPU image lacks (cp312 wheels).
BUNDLE_WHEELS = ["annotated-types==0.7.0", "apache-tvm-ffi==0.1.11", "compressed-tensors==0.18.0", "dill==0.4.1",
                 "distro==1.9.0", "gguf==0.19.0", "jiter", "msgspec==0.22.0", "openai==2.8.0", "orjson",
                 "partial-json-parser==0.2.1.1.post7", "pybase64==1.5.1", "pydantic==2.13.4",
                 "pydantic-core==2.46.4", "sniffio", "starlette==1.10.0", "typing-inspection==0.4.2"]


@dataclass
class Report:
    role: str
    rank: int
    ok: bool = False
    bytes: int = 0
    aux_ok: bool = False
    t_start: float = 0.0
    t_end: float = 0.0
    error: str = ""
    polls: list[int] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _sglang() -> dict[str, Any]:
    """Import SGLang's classes (real torchvision if it imports, else the test stub) and kvd's plug-in."""
    sys.path.insert(0, str(ROOT / "tests" / "sglang"))
    import torchvision_stub

    torchvision_stub.install()
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    from kvd.sglang.plugin import register

    register()
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()
    import sglang.srt.disaggregation.utils as u

    return {t.value: u.get_kv_class(TransferBackend("kvd"), t) for t in KVClassType}


def _server_args(tp: int, bootstrap_port: int, sock: str, port: int) -> Any:
    return types.SimpleNamespace(tp_size=tp, dp_size=1, pp_size=1, enable_dp_attention=False,
                                 disaggregation_bootstrap_port=bootstrap_port, kvd_socket=sock,
                                 disaggregation_bootstrap_host="127.0.0.1",
                                 disaggregation_decode_allocation_policy="early", port=port)


def _heads(a: Any, tp: int, rank: int) -> range:
    if a.mla:
        return range(0, 1)
    local = max(1, a.kv_heads // tp)
    first = (rank // max(1, tp // a.kv_heads)) * local
    return range(first, first + local)


def _plan(a: Any) -> list[tuple[int, list[int], list[int]]]:
    """(room, prefill pages, decode pages): disjoint, in other orders on the two sides."""
    rooms = []
    for i in range(a.rooms):
        src = list(range(1 + i * a.pages_per_room, 1 + (i + 1) * a.pages_per_room))
        dst = [a.num_pages - 1 - p for p in range(i * a.pages_per_room, (i + 1) * a.pages_per_room)][::-1]
        rooms.append((0x5C1A_0000 + i, src, dst))
    return rooms


def _pool(torch: Any, a: Any, tp: int) -> list[Any]:
    """KV buffers as SGLang's pools allocate them: one CUDA tensor per layer (K then V; MLA: one)."""
    tokens = a.num_pages * a.page_size + a.page_size  # SGLang pads one page (slot 0 is never used)
    if a.mla:
        return [torch.empty((tokens, 1, a.head_dim), dtype=torch.bfloat16, device="cuda") for _ in range(a.layers)]
    heads = max(1, a.kv_heads // tp)
    k = [torch.empty((tokens, heads, a.head_dim), dtype=torch.bfloat16, device="cuda") for _ in range(a.layers)]
    v = [torch.empty((tokens, heads, a.head_dim), dtype=torch.bfloat16, device="cuda") for _ in range(a.layers)]
    return k + v


def _kv_args(bufs: list[Any], meta: Any, a: Any, tp: int, rank: int) -> Any:
    from sglang.srt.disaggregation.base.conn import KVArgs

    args = KVArgs()
    args.engine_rank, args.pp_rank, args.system_dp_rank, args.prefill_start_layer = rank, 0, 0, 0
    args.kv_cache_dtype_str = "bfloat16"
    # MHATokenToKVPool.get_contiguous_buf_infos: pointers, whole lengths, one page's bytes per item
    args.kv_data_ptrs = [b.data_ptr() for b in bufs]
    args.kv_data_lens = [b.nbytes for b in bufs]
    args.kv_item_lens = [b[0].nbytes * a.page_size for b in bufs]
    args.num_draft_entries = 0
    if not a.mla:
        args.kv_head_num = max(1, a.kv_heads // tp)
        args.total_kv_head_num = a.kv_heads
    args.page_size = a.page_size
    args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens = meta.get_buf_infos()
    args.state_types = []
    args.gpu_id = 0
    args.ib_device = ""
    return args


def _aux_write(torch: Any, meta: Any, idx: int, room: int, n: int, hidden: int) -> None:
    """What the prefill's set_buf writes on the last chunk (first token, hidden state, room)."""
    meta.output_ids[idx][0] = 1000 + n
    meta.output_hidden_states[idx] = torch.arange(hidden, dtype=torch.bfloat16) + n
    meta.bootstrap_room[idx, 0] = room


def _tokens(torch: Any, pages: list[int], ps: int) -> Any:
    return torch.tensor([p * ps + o for p in pages for o in range(ps)], device="cuda")


def _rank(q: Any, barrier: Any, role: str, tp: int, rank: int, sock: str, bport: int, a: Any) -> None:
    rep = Report(role, rank)
    mgr = None
    try:
        import torch
        from sglang.srt.disaggregation.base.conn import KVPoll
        from sglang.srt.disaggregation.utils import DisaggregationMode, MetadataBuffers

        from tools.gpu_e2e import _expected

        C = _sglang()
        torch.cuda.set_device(0)
        bufs = _pool(torch, a, tp)
        heads = _heads(a, tp, rank)
        meta = MetadataBuffers(size=a.rooms + 4, hidden_size=a.hidden, hidden_states_dtype=torch.bfloat16,
                               max_sampling_mask_tokens=4)
        if role == "prefill":
            every = torch.arange(bufs[0].shape[0], device="cuda")
            for b, buf in enumerate(bufs):
                buf.view(torch.int16).copy_(_expected(torch, b, heads, every, a.head_dim, "cuda"))
        else:
            for buf in bufs:
                buf.view(torch.int16).fill_(CANARY)
        torch.cuda.synchronize()
        mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
        mgr = C["manager"](_kv_args(bufs, meta, a, tp, rank), mode,
                           _server_args(tp, bport, sock, 31000 + rank), a.mla)
        barrier.wait()  # every prefill rank is in the bootstrap server
        addr = f"127.0.0.1:{bport}"
        rep.t_start = time.time()
        pollers = []
        if role == "prefill":
            for n, (room, src, _dst) in enumerate(_plan(a)):
                _aux_write(torch, meta, n, room, n, a.hidden)
                s = C["sender"](mgr, addr, room)
                s.init(len(src), n)
                chunks = [src[i:i + a.chunk_pages] for i in range(0, len(src), a.chunk_pages)] + [[]]
                for i, chunk in enumerate(chunks):
                    if s.should_send_kv_chunk(len(chunk), i == len(chunks) - 1):
                        s.send(torch.tensor(chunk, dtype=torch.int32).numpy())
                pollers.append(s)
        else:
            deadline = time.monotonic() + 60
            while not mgr.try_ensure_parallel_info(addr):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bootstrap server {addr} never had every prefill rank")
                time.sleep(0.1)
            for n, (room, _src, dst) in enumerate(_plan(a)):
                rv = C["receiver"](mgr, addr, room)
                rv.init(0)
                meta.clear_slot(n + 1)
                rv.send_metadata(torch.tensor(dst, dtype=torch.int32).numpy(), n + 1, None)
                pollers.append(rv)
        deadline = time.monotonic() + a.timeout
        while True:
            rep.polls = [p.poll() for p in pollers]
            if all(x in (KVPoll.Success, KVPoll.Failed) for x in rep.polls) or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        rep.t_end = time.time()
        for p, st in zip(pollers, rep.polls, strict=True):
            if st != KVPoll.Success:
                try:
                    p.failure_exception()
                except Exception as exc:
                    rep.mismatches.append(f"room {p.bootstrap_room}: poll {st}: {exc}")
        if role == "decode":
            _check_decode(torch, rep, bufs, meta, heads, a)
        rep.ok = not rep.mismatches and all(x == KVPoll.Success for x in rep.polls)
    except Exception as exc:  # reported to the parent, which prints it
        import traceback

        rep.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    q.put(rep)
    barrier.wait()  # pools stay alive (and registered) until every rank is done
    if mgr is not None:
        mgr.close()


def _check_decode(torch: Any, rep: Report, bufs: list[Any], meta: Any, heads: range, a: Any) -> None:
    from tools.gpu_e2e import _expected

    ps = a.page_size
    touched = torch.zeros(bufs[0].shape[0], dtype=torch.bool, device="cuda")
    for n, (room, src, dst) in enumerate(_plan(a)):
        src_t, dst_t = _tokens(torch, src, ps), _tokens(torch, dst, ps)
        touched[dst_t] = True
        for b, buf in enumerate(bufs):
            if not torch.equal(buf.view(torch.int16)[dst_t], _expected(torch, b, heads, src_t, a.head_dim, "cuda")):
                rep.mismatches.append(f"room {room:#x} buffer {b}")
                break
        want_hidden = torch.arange(a.hidden, dtype=torch.bfloat16) + n
        if (int(meta.output_ids[n + 1][0]) != 1000 + n or int(meta.bootstrap_room[n + 1, 0]) != room
                or not torch.equal(meta.output_hidden_states[n + 1], want_hidden)):
            rep.mismatches.append(f"room {room:#x}: aux rows differ")
    for b, buf in enumerate(bufs):
        rest = buf.view(torch.int16)[~touched]
        if rest.numel() and not bool((rest == CANARY).all()):
            rep.mismatches.append(f"buffer {b}: rows outside every room changed")
    per_token = sum(buf[0].nbytes for buf in bufs)
    rep.bytes = int(touched.sum()) * per_token
    rep.aux_ok = not any("aux" in m for m in rep.mismatches)


def run(a: Any) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: tools/gpu_sglang.py needs a GPU")
    from tools.cluster import free_port, start_daemon

    C = _sglang()
    tmp = Path(tempfile.mkdtemp(prefix="kvd-sglang-gpu-"))
    flags = ["--timeouts-waiting-s", str(a.timeout), "--timeouts-transfer-s", str(a.timeout),
             "--transport-same-node", a.same_node]
    prefill = start_daemon(tmp, "prefill", *flags)
    decode = start_daemon(tmp, "decode", *flags)
    bport = free_port()
    server = C["bootstrap_server"]("127.0.0.1", bport)
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        barrier = ctx.Barrier(a.prefill_tp + a.decode_tp)
        procs = [ctx.Process(target=_rank, args=(q, barrier, "prefill", a.prefill_tp, r, prefill.socket_path,
                                                 bport, a)) for r in range(a.prefill_tp)]
        procs += [ctx.Process(target=_rank, args=(q, barrier, "decode", a.decode_tp, r, decode.socket_path,
                                                  bport, a)) for r in range(a.decode_tp)]
        for p in procs:
            p.start()
        reports = [q.get(timeout=a.timeout + 180) for _ in procs]
        for p in procs:
            p.join(60)
        dstat, pstat = decode.status()["daemon"], prefill.status()["daemon"]
    finally:
        server.close()
        prefill.stop()
        decode.stop()
    dec = [r for r in reports if r.role == "decode"]
    nbytes = sum(r.bytes for r in dec)
    seconds = max(r.t_end for r in reports) - min(r.t_start for r in reports) if all(r.t_end for r in reports) else 0.0
    return {"ok": all(r.ok for r in reports), "aux_ok": bool(dec) and all(r.aux_ok for r in dec), "bytes": nbytes,
            "seconds": seconds, "gbps": nbytes / seconds / 1e9 if seconds > 0 else 0.0,
            "paths": dstat.get("rooms_by_path"), "errors": {**pstat.get("errors", {}), **dstat.get("errors", {})},
            "failures": [(r.role, r.rank, r.polls, r.mismatches[:3], r.error) for r in reports if not r.ok],
            "tmp": str(tmp)}


def bundle(out: Path) -> int:
    """SGLang's Python files (zip) and cp312 wheels of what its classes import, for an offline GPU host."""
    import sglang

    out.mkdir(parents=True, exist_ok=True)
    pkg = Path(sglang.__file__).resolve().parent
    target = out / f"sglang-{sglang.__version__}-purepy.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(pkg.rglob("*")):
            if f.is_file() and f.suffix != ".so" and "__pycache__" not in f.parts and "test" not in f.parts:
                z.write(f, str(f.relative_to(pkg.parent)))
    plat = [x for n in ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
                        "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
            for x in ("--platform", n)]
    rc = 0
    for w in BUNDLE_WHEELS:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(out), w],
                           check=False)
        if r.returncode:
            print(f"warning: no cp312 wheel for {w}", file=sys.stderr)
            rc = 1
    print(f"{target} {target.stat().st_size / 2**20:.1f} MiB; wheels in {out}")
    return rc


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--prefill-tp", type=int, default=2)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (MLA: kv_lora_rank + rope dim, e.g. 576)")
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rooms", type=int, default=4)
    ap.add_argument("--pages-per-room", type=int, default=64)
    ap.add_argument("--chunk-pages", type=int, default=24, help="pages per scheduler chunk (chunked prefill)")
    ap.add_argument("--hidden", type=int, default=256, help="MetadataBuffers hidden size (aux row)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--same-node", default="cuda_ipc", choices=("cuda_ipc", "off"),
                    help="the daemons' transport.same_node ('off': Mooncake over TCP)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bundle"]:
        return bundle(Path(argv[1] if len(argv) > 1 else ".whl"))
    a = parser().parse_args(argv)
    a.num_pages = a.rooms * a.pages_per_room + 64  # 64 pages no room touches (canary-checked)
    r = run(a)
    kind = "MLA" if a.mla else f"{a.kv_heads} kv heads"
    print(f"SGLang 0.5.23 classes on kvd, GPU pools: TP {a.prefill_tp}->{a.decode_tp}, {a.layers} layers, {kind}, "
          f"head_dim {a.head_dim}, bf16, page {a.page_size}, {a.rooms} room(s) x {a.pages_per_room} pages in "
          f"chunks of {a.chunk_pages} + a zero-page last chunk; same_node={a.same_node}, paths {r['paths']}")
    print(f"  byte-exact: {r['ok']}  aux rows exact: {r['aux_ok']}  {r['bytes'] / 2**20:.1f} MiB in "
          f"{r['seconds']:.3f} s = {r['gbps']:.2f} GB/s, daemon errors {r['errors']}")
    for f in r["failures"]:
        print("  failure:", f)
    if r["failures"]:
        print(f"  daemon logs: {r['tmp']}")
    return 0 if r["ok"] and r["aux_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
