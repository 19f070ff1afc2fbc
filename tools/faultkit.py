"""Fault injection against real kvd daemons on separate network-namespace "nodes".

One :func:`run_scenario` call builds a small cluster (a prefill node and one or two decode
nodes, each a namespace with its own address, see tools/netns.py), starts fake engine ranks
inside the nodes, starts rooms, injects one fault in the middle of the transfers, heals it,
and then checks the invariants kvd promises. It returns a :class:`Result` whose
``violations`` lists every invariant that broke, with the evidence; the tests in
tests/faults/ assert that list is empty and tools/soak.py repeats scenarios for a long run.

Invariants checked (see ``check``):

* every room ends within its deadline plus ``SLACK`` (a stopped daemon's own rooms: within
  ``SLACK`` of being continued), and every failed room is released within the abort fence
  plus ``SLACK`` after that;
* a room that succeeded is byte-exact, a room that failed has a reason;
* the sender never reports success for a room its receiver failed;
* zero bytes after release: the decode engine writes a sentinel into each failed room's
  pages as soon as kvd says "released"; after the fault is healed and things settled, every
  sentinel byte must still be there (and every page of no room still holds the canary);
* pools and staging reclaimed: every surviving daemon ends with no rooms and whole staging;
* a daemon that was not killed is still alive, and the cluster keeps serving: a fresh
  transfer afterwards (same engine ids, the killed daemon restarted on its port) is exact;
* rooms to a healthy peer beside a stalled one finish as if nothing happened.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.fake_engine import RoomPlan, build_layout  # noqa: E402
from tools.netns import Net, NodeDaemon, enter  # noqa: E402

# --- timing ------------------------------------------------------------------------------------
BOOTSTRAP_S = 2.0
WAITING_S = 3.0
TRANSFER_S = 3.0
HB_INTERVAL_S = 0.25
HB_MISSES = 3
FENCE_S = 1.0
DEADLINE_S = max(BOOTSTRAP_S, WAITING_S, TRANSFER_S) + HB_INTERVAL_S * HB_MISSES
"""Latest a room in flight at the fault may end, counted from the fault: its longest state
deadline plus dead-peer detection."""
SLACK_S = 3.0
"""Added to every bound: process scheduling on a loaded 2-core CI machine."""
STOP_S = DEADLINE_S + FENCE_S + 1.5
"""How long a daemon stays stopped / a link stays down: longer than every deadline and the
abort fence together, so rooms fail and are released while the fault lasts."""
SETTLE_S = 2.0
"""After the fault heals: time for anything late (writes, messages) to land before checking."""
HEALTHY_S = 2.5
"""Rooms to a healthy peer beside a stalled one end within this (a normal room takes < 0.5 s)."""

TIMEOUT_FLAGS = ("--timeouts-bootstrap-s", str(BOOTSTRAP_S), "--timeouts-waiting-s", str(WAITING_S),
                 "--timeouts-transfer-s", str(TRANSFER_S),
                 "--timeouts-heartbeat-interval-s", str(HB_INTERVAL_S),
                 "--timeouts-heartbeat-misses", str(HB_MISSES), "--timeouts-abort-fence-s", str(FENCE_S))
STAGING_FLAGS = ("--staging-enabled", "--staging-pool-bytes", "2MiB", "--staging-chunk-tokens", "32")

CANARY = 0x5A
SENTINEL = 0xC3
SEED = 11


@dataclass(frozen=True)
class PathCfg:
    name: str
    prefill_tp: int
    decode_tp: int
    hisparse: bool = False
    staging: bool = False
    kv_heads: int = 8
    layers: int = 2
    head_dim: int = 64
    page_size: int = 16
    num_pages: int = 512
    pages: int = 96
    """Pages per room: enough bytes that writes are still on the wire when the fault hits."""
    inline: bool = False
    """Small rooms whose bytes ride in the status (kvd.core.inline); every other path forces
    Mooncake writes (inline off), so that its faults hit transport writes on the wire."""

    def flags(self) -> tuple[str, ...]:
        return TIMEOUT_FLAGS + (STAGING_FLAGS if self.staging else ()) + \
            (() if self.inline else ("--transfer-inline-max-bytes", "0"))


PATHS = {
    "direct": PathCfg("direct", 1, 1, head_dim=128, pages=120),
    "staged": PathCfg("staged", 2, 1, staging=True, num_pages=128, pages=24),
    "hisparse": PathCfg("hisparse", 1, 1, hisparse=True, num_pages=256, pages=32),
    # heterogeneous TP 2 -> 1 without staging, chunks of 8 pages (256 KiB per sender): inline
    "inline": PathCfg("inline", 2, 1, num_pages=256, pages=32, inline=True),
}

FAULTS = ("stop_prefill", "stop_decode", "kill9_prefill", "kill9_decode", "restart_prefill",
          "restart_decode", "kill_prefill_engine", "kill_decode_engine", "partition", "stalled_peer")

ALL_FAULTS = ("none", *FAULTS)
"""``none``: the same scenario without a fault (a baseline for the soak; CI runs FAULTS)."""

# Which issue-12 defects each fault covers (the tests carry them as markers too).
DEFECTS: dict[str, tuple[int, ...]] = {
    "stop_prefill": (1, 7), "stop_decode": (1, 6), "kill9_prefill": (3,), "kill9_decode": (3,),
    "restart_prefill": (3,), "restart_decode": (3,), "kill_prefill_engine": (6,),
    "kill_decode_engine": (6,), "partition": (1, 7), "stalled_peer": (4, 5),
}


def plan_rooms(cfg: PathCfg, rooms: int, pages: int, first_room: int, seed: int,
               page_offset: int = 0) -> list[RoomPlan]:
    """Scattered, disjoint pages; HiSparse rooms end mid-page and name token indices."""
    rng = np.random.default_rng(seed)
    src = rng.permutation(cfg.num_pages)[: rooms * pages].tolist()
    dst_space = cfg.num_pages * cfg.page_size if cfg.hisparse else cfg.num_pages
    out = []
    if cfg.hisparse:
        toks = rng.permutation(dst_space)[: rooms * pages * cfg.page_size].tolist()
        for i in range(rooms):
            length = (pages - 1) * cfg.page_size + int(rng.integers(1, cfg.page_size + 1))
            out.append(RoomPlan(first_room + i, src[i * pages:(i + 1) * pages],
                                toks[i * pages * cfg.page_size:][:length], length))
    else:
        dst = rng.permutation(dst_space)[: rooms * pages].tolist()
        for i in range(rooms):
            out.append(RoomPlan(first_room + i, src[i * pages:(i + 1) * pages], dst[i * pages:(i + 1) * pages]))
    return out


# --- engine processes (run inside a node's namespace) ---------------------------------------------

def _chunks(pages: list[int], n: int) -> list[list[int]]:
    size = max(1, -(-len(pages) // n))
    return [pages[i:i + size] for i in range(0, len(pages), size)]


def prefill_engine(conn: Any, netns: str, sock: str, layout_args: tuple, rooms: list[dict],
                   bootstrap: str, chunks: int, chunks_before: int) -> None:
    """A prefill rank: register, send ``chunks_before`` chunks of every room, wait for "go",
    send the rest (blocking if the daemon is stopped), wait for every room's final state,
    report, and keep the pool registered until "exit"."""
    from kvd.client import KvdClient, KvdError, KvdTimeout
    from kvd.hostpool import HostPool
    from tools.kvpattern import fill_prefill
    enter(netns)
    plans = [RoomPlan.from_dict(r) for r in rooms]
    layout = build_layout(*layout_args)
    out: dict[str, Any] = {"rooms": {}, "error": ""}
    pool = HostPool.create(layout)
    try:
        fill_prefill(pool, layout, SEED)
        client = KvdClient(sock, timeout=30.0)
        pid = client.register_pool(layout, pool, bootstrap=bootstrap)
        conn.send(("ready", pid))
        split = {p.room: _chunks(p.src_pages, chunks) for p in plans}
        refused: dict[int, str] = {}
        for p in plans:
            for c in split[p.room][:chunks_before]:
                client.send(pid, p.room, c, False)
        conn.send(("sent_first", None))

        def send_chunks(lo: int, hi: int) -> None:
            for p in plans:
                cs = split[p.room]
                for i in range(max(lo, 0), min(hi, len(cs))):
                    if p.room in refused:
                        break
                    last = i == len(cs) - 1
                    try:
                        client.send(pid, p.room, cs[i], last, aux=f"aux-{p.room}".encode() if last else b"")
                    except KvdError as exc:
                        if getattr(exc, "kind", "") == "connection":
                            raise
                        refused[p.room] = f"send refused: {exc}"

        conn.recv()  # go: every chunk but the last (the bulk of the bytes)
        send_chunks(chunks_before, chunks - 1)
        conn.send(("sent_mid", None))
        conn.recv()  # go2: the last chunks (blocks while the daemon is stopped)
        send_chunks(chunks - 1, chunks)
        deadline = time.monotonic() + 60
        for p in plans:
            try:
                st = client._wait_for(p.room, max(0.0, deadline - time.monotonic()), client._t.final, "final")
                out["rooms"][p.room] = {"state": st.state, "reason": st.reason, "t_final": time.time()}
            except KvdTimeout:
                out["rooms"][p.room] = {"state": "hung", "reason": refused.get(p.room, ""), "t_final": None}
    except Exception as exc:  # the daemon died: every unfinished room ends here, with the reason
        out["error"] = f"{type(exc).__name__}: {exc}"
        for p in plans:
            out["rooms"].setdefault(p.room, {"state": "failed", "reason": out["error"], "t_final": time.time()})
    conn.send(("done", out))
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # exit
    pool.close()


def decode_engine(conn: Any, netns: str, sock: str, layout_args: tuple, rooms: list[dict],
                  bootstrap: str, prefill_page_size: int) -> None:
    """A decode rank: canary-fill, register, receive every room; then watch events: a final
    state is timed, a failed room's pages get the sentinel the moment kvd releases them.
    Reports ("settled", outcomes); on "verify" checks every byte of its pool."""
    from kvd.client import KvdClient, KvdTimeout
    from kvd.hostpool import HostPool
    from tools.kvpattern import fill_canary, verify_decode
    enter(netns)
    plans = [RoomPlan.from_dict(r) for r in rooms]
    layout = build_layout(*layout_args)
    pool = HostPool.create(layout)
    out: dict[str, Any] = {"rooms": {}, "error": ""}
    try:
        fill_canary(pool, CANARY)
        client = KvdClient(sock, timeout=30.0)
        pid = client.register_pool(layout, pool)
        conn.send(("ready", pid))
        conn.recv()  # post: the prefill ranks have registered
        for p in plans:
            client.recv(pid, p.room, bootstrap, "P", p.dst_pages, enable_hisparse=layout.hisparse)
        conn.send(("posted", None))
        toks = {p.room: p.tokens(prefill_page_size, layout.hisparse)[1] for p in plans}
        deadline = time.monotonic() + 60
        pending = {p.room for p in plans}
        while pending and time.monotonic() < deadline:
            with contextlib.suppress(KvdTimeout):
                client._pump(time.monotonic() + 0.05, "events")
            for room in list(pending):
                st = client.pushed(room)
                if st is None:
                    continue
                rec = out["rooms"].setdefault(room, {})
                if st.done and "state" not in rec:
                    rec.update(state=st.state, reason=st.reason, t_final=time.time(),
                               aux_ok=st.aux == f"aux-{room}".encode(), bytes_done=st.bytes_done,
                               bytes_total=st.bytes_total)
                if st.released and "t_released" not in rec:
                    rec["t_released"] = time.time()
                    if rec.get("state") == "failed":
                        for b in range(layout.num_buffers):
                            pool.buffer(b)[toks[room]] = SENTINEL
                        rec["sentinel"] = True
                if "state" in rec and (rec["state"] == "success" or "t_released" in rec):
                    pending.discard(room)
        for room in pending:
            out["rooms"].setdefault(room, {})
            out["rooms"][room].setdefault("state", "hung")
    except Exception as exc:  # the daemon died: its rooms end here (nothing can land: its
        out["error"] = f"{type(exc).__name__}: {exc}"  # transfer engine, the writer, is gone)
        for p in plans:
            rec = out["rooms"].setdefault(p.room, {})
            if "state" not in rec:
                rec.update(state="failed", reason=out["error"], t_final=time.time(), daemon_lost=True)
    conn.send(("settled", out))
    try:
        conn.recv()  # verify
    except (EOFError, OSError):
        return
    problems: list[str] = []
    ok = [p for p in plans if out["rooms"].get(p.room, {}).get("state") == "success"]
    sent = [p for p in plans if out["rooms"].get(p.room, {}).get("sentinel")]
    other = [p for p in plans if p not in ok and p not in sent]

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    src = cat([p.tokens(prefill_page_size, layout.hisparse)[0] for p in ok])
    dst = cat([toks[p.room] for p in ok])
    ignore = cat([toks[p.room] for p in sent + other])
    problems += verify_decode(pool, layout, src, dst, SEED, CANARY, ignore_tokens=ignore)
    for p in sent:
        for b in range(layout.num_buffers):
            got = pool.buffer(b)[toks[p.room]]
            bad = got != SENTINEL
            if bad.any():
                problems.append(f"room {p.room} buffer {b}: {int(bad.sum())} bytes of the released pages "
                                f"changed after release (sentinel {SENTINEL:#x} overwritten)")
    conn.send(("verified", problems))
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # exit
    pool.close()


class Engine:
    """A handle on one engine process: the Process and its end of the pipe."""

    def __init__(self, name: str, target: Any, args: tuple) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        self.last: Any = None

    def expect(self, kind: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"engine {self.name}: no {kind!r} within {timeout}s "
                               f"(alive={self.proc.is_alive()})")
        got, value = self.conn.recv()
        if got != kind:
            raise RuntimeError(f"engine {self.name}: expected {kind!r}, got {got!r}: {value}")
        self.last = value
        return value

    def tell(self, what: str) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(what)

    def kill(self) -> None:
        # It may exit between the check and the kill (a slow "exit" on a loaded machine).
        with contextlib.suppress(ProcessLookupError):
            if self.proc.is_alive():
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5)

    def close(self) -> None:
        self.tell("exit")
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


# --- scenario --------------------------------------------------------------------------------------

@dataclass
class Result:
    path: str
    fault: str
    violations: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        head = f"{self.fault}[{self.path}] {self.seconds:.1f}s timings={json.dumps(self.timings)}"
        return "\n".join([head, *("  VIOLATION: " + v for v in self.violations),
                          *("  note: " + n for n in self.notes)])


class Cluster:
    """Nodes, daemons and engines of one scenario; close() removes everything."""

    def __init__(self, tmp: Path, cfg: PathCfg, decode_nodes: int = 1, extra_prefill: tuple = (),
                 extra: tuple = ()) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.net = Net()
        self.engines: list[Engine] = []
        try:
            self.pnode = self.net.add_node("prefill")
            self.dnodes = [self.net.add_node(f"decode{i}") for i in range(decode_nodes)]
            self.prefill = self.net.start_daemon(tmp, self.pnode, "prefill", *cfg.flags(), *extra,
                                                 *extra_prefill)
            self.decodes = [self.net.start_daemon(tmp, n, f"decode{i}", *cfg.flags(), *extra)
                            for i, n in enumerate(self.dnodes)]
        except Exception:
            self.close()
            raise

    def layout_args(self, role: str, engine_id: str, tp: int, rank: int) -> tuple:
        c = self.cfg
        return (role, engine_id, tp, rank, c.layers, c.kv_heads, c.head_dim, "bfloat16", c.page_size,
                c.num_pages, False, c.hisparse)

    def start_prefill(self, rooms: list[RoomPlan], chunks: int = 4, chunks_before: int = 2) -> list[Engine]:
        c = self.cfg
        es = [Engine(f"prefill{r}", prefill_engine,
                     (self.pnode.netns, self.prefill.socket_path, self.layout_args("prefill", "P", c.prefill_tp, r),
                      [p.to_dict() for p in rooms], self.prefill.address, chunks, chunks_before))
              for r in range(c.prefill_tp)]
        self.engines += es
        return es

    def start_decode(self, i: int, rooms: list[RoomPlan], engine_id: str = "D") -> Engine:
        c = self.cfg
        e = Engine(f"decode{i}", decode_engine,
                   (self.dnodes[i].netns, self.decodes[i].socket_path,
                    self.layout_args("decode", engine_id, c.decode_tp, 0), [p.to_dict() for p in rooms],
                    self.prefill.address, c.page_size))
        self.engines.append(e)
        return e

    def daemons(self) -> list[NodeDaemon]:
        return [self.prefill, *self.decodes]

    def close(self) -> None:
        for e in self.engines:
            with contextlib.suppress(Exception):
                e.close()
        self.net.close()


def fresh_transfer(cl: Cluster, first_room: int, seed: int) -> list[str]:
    """A legitimate transfer on every decode node, byte-exact or the problems found."""
    problems: list[str] = []
    for i in range(len(cl.decodes)):
        rooms = plan_rooms(cl.cfg, 2, 4, first_room + 100 * i, seed + i)
        dec = cl.start_decode(i, rooms, engine_id=f"D{i}")
        pre = cl.start_prefill(rooms, chunks=2, chunks_before=0)
        try:
            for e in [*pre, dec]:
                e.expect("ready", 30)
            dec.tell("post")
            dec.expect("posted", 30)
            for e in pre:
                e.expect("sent_first", 30)
                e.tell("go")
                e.expect("sent_mid", 30)
                e.tell("go2")
            settled = dec.expect("settled", 40)
            for e in pre:
                e.expect("done", 40)
            dec.tell("verify")
            bad = dec.expect("verified", 60)
            for room, rec in sorted(settled["rooms"].items()):
                if rec.get("state") != "success":
                    problems.append(f"fresh room {room} to decode{i}: {rec.get('state')} ({rec.get('reason')})")
            if settled["error"]:
                problems.append(f"fresh transfer to decode{i}: engine error {settled['error']}")
            problems += [f"fresh transfer to decode{i}: {b}" for b in bad]
        except Exception as exc:
            problems.append(f"fresh transfer to decode{i}: {type(exc).__name__}: {exc}")
        finally:
            for e in [*pre, dec]:
                e.close()
    return problems


def wait_reclaimed(d: NodeDaemon, timeout: float) -> str:
    """'' once the daemon has no rooms and whole staging, else what is left."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            st = d.status()
        except Exception as exc:
            last = f"status failed: {exc}"
            time.sleep(0.2)
            continue
        rooms = st.get("rooms", [])
        staging = st["daemon"]["staging"]
        if not rooms and staging.get("whole", True) and not staging.get("reserved_bytes") \
                and not staging.get("in_use_bytes"):
            return ""
        last = (f"{len(rooms)} rooms left ({[(r.get('room'), r.get('role'), r.get('state')) for r in rooms][:6]}), "
                f"staging whole={staging.get('whole')} reserved={staging.get('reserved_bytes')} "
                f"in_use={staging.get('in_use_bytes')}")
        time.sleep(0.2)
    return last


BAD_LOG = ("Traceback", "Task exception was never retrieved", "exception was never retrieved")


def log_problems(d: NodeDaemon) -> list[str]:
    """Unhandled-exception traces in a daemon's log (issue 12 defects 2 and 9)."""
    text = d.log()
    out = []
    for needle in BAD_LOG[:2]:
        if needle in text:
            i = text.index(needle)
            line_start = text.rfind("\n", 0, i) + 1
            out.append(f"{d.name} log has {needle!r}: {text[line_start:line_start + 300]!r}")
    return out


def run_scenario(tmp: Path, path: str, fault: str, rooms: int = 4, pages: int = 0) -> Result:
    """Run one fault on one path; never raises for a kvd misbehaviour (it is a violation)."""
    t_start = time.monotonic()
    cfg = PATHS[path]
    res = Result(path, fault)
    v = res.violations
    tmp.mkdir(parents=True, exist_ok=True)
    stalled = fault == "stalled_peer"
    cl = Cluster(tmp, cfg, decode_nodes=2 if stalled else 1,
                 extra_prefill=("--transfer-queues", "1") if stalled else ())
    try:
        _scenario(cl, res, fault, rooms, pages or cfg.pages)
    except Exception as exc:
        v.append(f"scenario aborted: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    finally:
        for d in cl.daemons():
            if not d.alive() and d.proc.returncode not in (-9, 0, -15):
                v.append(f"daemon {d.name} exited with {d.proc.returncode}: {d.log_tail(8)}")
        if v:
            for d in cl.daemons():
                res.notes.append(f"--- {d.name} log tail ---\n{d.log_tail(15)}")
        cl.close()
    res.seconds = time.monotonic() - t_start
    return res


def _scenario(cl: Cluster, res: Result, fault: str, nrooms: int, pages: int) -> None:
    cfg, v = cl.cfg, res.violations
    stalled = fault == "stalled_peer"
    # Stalled peer: big rooms to decode0 (more than the socket buffers hold), small ones to decode1.
    plans = [plan_rooms(cfg, nrooms, pages, 1000, 1)]
    if stalled:
        plans = [plan_rooms(cfg, 2, pages, 1000, 1), plan_rooms(cfg, 2, max(4, pages // 8), 2000, 2)]  # >= 1 page a chunk
    all_rooms = [p for ps in plans for p in ps]
    decs = [cl.start_decode(i, ps, engine_id=f"D{i}") for i, ps in enumerate(plans)]
    pres = cl.start_prefill(all_rooms)
    for e in [*pres, *decs]:
        e.expect("ready", 40)
    for e in decs:
        e.tell("post")
        e.expect("posted", 20)
    for e in pres:
        e.expect("sent_first", 20)
    time.sleep(0.2)  # the rooms are transferring (first chunks written)
    for e in pres:  # the bulk of the bytes goes on the wire; the fault hits while it is there
        e.tell("go")
    for e in pres:
        e.expect("sent_mid", 20)
    P, D = cl.prefill, cl.decodes[0]
    stopped: NodeDaemon | None = None
    killed: NodeDaemon | None = None
    t_fault = time.time()
    t_resume = t_fault
    if fault == "stop_prefill" or fault == "stop_decode" or stalled:
        stopped = P if fault == "stop_prefill" else D
        stopped.sigstop()
    elif fault in ("kill9_prefill", "kill9_decode", "restart_prefill", "restart_decode"):
        killed = P if fault.endswith("prefill") else D
        killed.kill()
        if fault.startswith("restart"):
            new = cl.net.restart(cl.tmp, killed)
            res.timings["restart_s"] = round(time.time() - t_fault, 2)
            _replace(cl, killed, new)
    elif fault == "kill_prefill_engine":
        pres[0].kill()
    elif fault == "kill_decode_engine":
        decs[0].kill()
    elif fault == "partition":
        cl.net.partition(cl.pnode)
    t_go = time.time()
    for e in pres:
        if e.proc.is_alive():
            e.tell("go2")
    if stalled:  # rooms to the healthy peer, while the other is stopped
        healthy = decs[1].expect("settled", HEALTHY_S + SLACK_S + 30)
        for room, rec in sorted(healthy["rooms"].items()):
            took = (rec.get("t_final") or 1e18) - t_go
            res.timings.setdefault("healthy_max_s", 0.0)
            res.timings["healthy_max_s"] = round(max(res.timings["healthy_max_s"], took), 2)
            if rec.get("state") != "success" or took > HEALTHY_S:
                v.append(f"[defect 4] room {room} to the healthy decode daemon beside a stalled one: "
                         f"{rec.get('state')} after {took:.1f}s (bound {HEALTHY_S}s) {rec.get('reason', '')}")
    if stopped is not None or fault == "partition":
        time.sleep(max(0.0, t_fault + STOP_S - time.time()))
        t_resume = time.time()
        if stopped is not None:
            stopped.sigcont()
        else:
            cl.net.heal(cl.pnode)
    elif fault.startswith("kill9"):
        time.sleep(max(0.0, t_fault + STOP_S - time.time()))
    # --- outcomes as the engines saw them
    bound = {"prefill": t_fault + DEADLINE_S + SLACK_S, "decode": t_fault + DEADLINE_S + SLACK_S}
    if stopped is P:
        # A write that was in flight when the prefill daemon stopped ends within Mooncake's
        # transfer timeout (tied to timeouts.transfer_s) after it resumes; only then is the
        # room's fence done and its engine told.
        bound["prefill"] = max(bound["prefill"], t_resume + TRANSFER_S + SLACK_S)
    if stopped is D:
        bound["decode"] = max(bound["decode"], t_resume + SLACK_S)
    wait_for = max(bound.values()) - time.time() + FENCE_S + 10
    dec_out = []
    for i, e in enumerate(decs):
        if stalled and i == 1:
            dec_out.append(e.last)
            continue
        if e.proc.is_alive():
            try:
                dec_out.append(e.expect("settled", max(5.0, wait_for)))
            except Exception as exc:
                v.append(f"decode engine {i}: {exc}")
                dec_out.append(None)
        else:
            dec_out.append(None)
    pre_out = []
    for e in pres:
        if e.proc.is_alive():
            try:
                pre_out.append(e.expect("done", max(5.0, bound["prefill"] - time.time() + 10)))
            except Exception as exc:
                v.append(f"{e.name}: {exc}")
    if stopped is not None and stopped.proc.poll() is None and time.time() < t_resume:
        pass
    # times and reasons
    worst = {"decode_final_s": 0.0, "decode_released_s": 0.0, "prefill_final_s": 0.0}
    dec_state: dict[int, str] = {}
    for i, out in enumerate(dec_out):
        if out is None:
            continue
        if out["error"] and not (killed is D and i == 0):
            v.append(f"decode engine {i} error: {out['error']}")
        limit = bound["decode"] if not (stalled and i == 1) else t_go + HEALTHY_S
        for room, rec in sorted(out["rooms"].items()):
            room = int(room)
            dec_state[room] = rec.get("state", "?")
            tf, tr = rec.get("t_final"), rec.get("t_released")
            if rec.get("state") == "hung" or tf is None:
                v.append(f"[defect 6] decode room {room}: no final state (still {rec}) within the scenario")
                continue
            worst["decode_final_s"] = max(worst["decode_final_s"], tf - t_fault)
            if tf > limit:
                v.append(f"decode room {room}: final ({rec['state']}: {rec.get('reason')}) {tf - t_fault:.1f}s "
                         f"after the fault, bound {limit - t_fault:.1f}s")
            if rec["state"] == "failed" and not rec.get("daemon_lost"):
                if not rec.get("reason"):
                    v.append(f"decode room {room}: failed without a reason")
                if tr is None:
                    v.append(f"[defect 6] decode room {room}: failed but never released")
                else:
                    worst["decode_released_s"] = max(worst["decode_released_s"], tr - t_fault)
                    if tr > max(tf, limit) + FENCE_S + SLACK_S:
                        v.append(f"decode room {room}: released {tr - t_fault:.1f}s after the fault, "
                                 f"{tr - tf:.1f}s after failing (fence {FENCE_S}s)")
            elif rec["state"] == "success" and not rec.get("aux_ok"):
                v.append(f"decode room {room}: success with the wrong aux")
    pre_state: dict[int, str] = {}
    for out in pre_out:
        if out["error"] and killed is not P:
            v.append(f"prefill engine error: {out['error']}")
        for room, rec in sorted(out["rooms"].items()):
            room = int(room)
            st = rec.get("state")
            if st == "success":
                pre_state.setdefault(room, "success")
            else:
                pre_state[room] = st
            tf = rec.get("t_final")
            if st == "hung" or tf is None:
                v.append(f"[defect 6] prefill room {room}: no final state within the scenario ({rec})")
                continue
            worst["prefill_final_s"] = max(worst["prefill_final_s"], tf - t_fault)
            if tf > bound["prefill"] and not (stalled and room >= 2000):
                v.append(f"prefill room {room}: final ({st}: {rec.get('reason')}) {tf - t_fault:.1f}s after "
                         f"the fault, bound {bound['prefill'] - t_fault:.1f}s")
            if st == "failed" and not rec.get("reason"):
                v.append(f"prefill room {room}: failed without a reason")
    res.timings.update({k: round(x, 2) for k, x in worst.items()})
    for room, st in sorted(pre_state.items()):
        if st == "success" and dec_state.get(room) not in (None, "success"):
            v.append(f"[defect 7] room {room}: the prefill engine was told success, the decode engine "
                     f"{dec_state[room]}")
    # --- settle, then check the bytes: success exact, sentinel intact after release
    if killed is not None and not fault.startswith("restart"):
        new = cl.net.restart(cl.tmp, killed)
        _replace(cl, killed, new)
    time.sleep(SETTLE_S)
    for i, e in enumerate(decs):
        if dec_out[i] is None or not e.proc.is_alive():
            continue
        e.tell("verify")
        try:
            bad = e.expect("verified", 60)
        except Exception as exc:
            v.append(f"decode engine {i} verify: {exc}")
            continue
        late = [b for b in bad if "after release" in b]
        res.timings["bytes_after_release"] = res.timings.get("bytes_after_release", 0) + sum(
            int(b.split(": ", 1)[1].split(" ", 1)[0]) for b in late)
        if late:
            v.append(f"[defect 1] bytes landed after release: {late[:4]}")
        rest = [b for b in bad if "after release" not in b]
        if rest:
            v.append(f"decode engine {i}: pool not byte-exact: {rest[:4]}")
    for e in [*pres, *decs]:
        e.close()
    # --- daemons alive, rooms and staging reclaimed
    for d in cl.daemons():
        if not d.alive():
            v.append(f"[defect 2] daemon {d.name} died: rc {d.proc.returncode}: {d.log_tail(6)}")
            continue
        left = wait_reclaimed(d, FENCE_S + SLACK_S + 2)
        if left:
            v.append(f"daemon {d.name} not reclaimed: {left}")
        v.extend(f"[defect 2/9] {x}" for x in log_problems(d))
    # --- the cluster keeps serving
    for p in fresh_transfer(cl, 5000, 99):
        v.append(f"[keeps serving] {p}")


def _replace(cl: Cluster, old: NodeDaemon, new: NodeDaemon) -> None:
    if old is cl.prefill:
        cl.prefill = new
    else:
        cl.decodes[cl.decodes.index(old)] = new


def _peer_send_child(q: Any, netns: str, address: str, frames: list[bytes], wait_s: float,
                     keys: tuple[bytes, bytes, bytes] | None) -> None:
    import zmq
    enter(netns)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 2000)  # a refused handshake must not hang the sender
    if keys is not None:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys
    s.connect(address)
    sent = 0
    for f in frames:
        try:
            s.send(f)
        except zmq.Again:
            break
        sent += 1
    time.sleep(wait_s)
    s.close()
    ctx.term()
    q.put(sent)


def attacker_keys(cl: Cluster, name: str = "attacker") -> tuple[bytes, bytes, bytes]:
    """A CurveZMQ key authorized by ``cl``'s daemons (an insider), bound to the first decode node's
    address, and the prefill daemon's server key: (public, secret, server) for a DEALER."""
    import zmq.auth

    from kvd.shell.peer_auth import keygen

    trust = cl.tmp / "trust"
    public, secret = keygen(trust / f"peer-{name}", f"tcp://{cl.dnodes[0].addr}:1", force=True)
    (trust / "authorized" / f"peer-{name}.key").write_bytes(public.read_bytes())
    time.sleep(1.1)  # daemons rescan their authorized-keys directory at most once a second
    pub, sec = zmq.auth.load_certificate(str(secret))
    server, _ = zmq.auth.load_certificate(str(trust / "prefill" / "kvd.key"))
    return pub, sec, server


def peer_send(netns: str, address: str, frames: list[bytes], wait_s: float = 0.5,
              keys: tuple[bytes, bytes, bytes] | None = None) -> int:
    """Send raw peer frames to ``address`` from a DEALER inside node namespace ``netns`` (a CURVE
    client with ``keys``; without, the daemon's CURVE handshake refuses it); the frames sent."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_peer_send_child, args=(q, netns, address, frames, wait_s, keys))
    proc.start()
    n = q.get(timeout=120)
    proc.join(10)
    return int(n)


def run_many(tmp: Path, jobs: list[tuple[str, str]]) -> dict[tuple[str, str], Result]:
    """Run scenarios concurrently (one thread each; every scenario has its own namespaces)."""
    results: dict[tuple[str, str], Result] = {}

    def one(path: str, fault: str) -> None:
        try:
            results[(path, fault)] = run_scenario(tmp / f"{fault}-{path}", path, fault)
        except Exception as exc:
            r = Result(path, fault, [f"scenario could not run: {type(exc).__name__}: {exc}"])
            results[(path, fault)] = r

    threads = [threading.Thread(target=one, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


__all__ = ["ALL_FAULTS", "DEFECTS", "FAULTS", "PATHS", "Cluster", "Result", "attacker_keys", "fresh_transfer",
           "peer_send", "run_many",
           "run_scenario"]
