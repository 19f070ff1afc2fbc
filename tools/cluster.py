"""Start real kvd daemons and fake engine rank processes on loopback; run one transfer.

Shared by the end-to-end tests and the benchmarks: every prefill and decode rank is its
own process (tools/fake_engine.py's run_*_rank) talking to a real kvd over its socket, and
the daemons move the bytes with Mooncake over loopback TCP. All ranks start their
transfers at one barrier, so a speed is the bytes and wall time of one and the same batch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvd.client import KvdClient  # noqa: E402
from tools.fake_engine import RoomPlan, build_layout, run_decode_rank, run_prefill_rank  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProc:
    name: str
    socket_path: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    _term_sent: bool = False

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def client(self, timeout: float = 10.0) -> KvdClient:
        return KvdClient(self.socket_path, timeout=timeout)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) if self.log_path.exists() else ""

    def begin_stop(self) -> None:
        """SIGTERM, not waited for (a daemon's stop joins its Mooncake engines' threads, ~0.5 s
        each: several daemons stop together, not one after the other). Sent once: a second
        signal makes the daemon exit at once."""
        if self.proc.poll() is None and not self._term_sent:
            self._term_sent = True
            self.proc.terminate()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.begin_stop()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def trust_flags(tmp: Path, name: str, address: str) -> list[str]:
    """A CurveZMQ keypair for daemon ``name`` (bound to ``address``) under ``tmp/trust``, its public
    key added to the cluster's shared authorized-keys directory (daemons pick up keys added later
    without a restart); the flags that make a daemon use them."""
    from kvd.shell.peer_auth import keygen

    trust = tmp / "trust"
    authorized = trust / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    from kvd.shell.peer_auth import certificate_metadata

    public, secret = trust / name / "kvd.key", trust / name / "kvd.key_secret"
    if not (public.exists() and certificate_metadata(public).get("address") == address):
        public, secret = keygen(trust / name, address, force=True)  # a restart keeps its key
    tmp_copy = authorized / f".{name}.key.tmp"
    tmp_copy.write_bytes(public.read_bytes())
    tmp_copy.rename(authorized / f"{name}.key")  # whole or absent, never half-written
    return ["--peer-key-file", str(secret), "--peer-authorized-keys", str(authorized)]


def peer_socket(tmp: Path, target: str, name: str = "tester", address: str = "", *,
                authorized: bool = True):
    """A ZMQ DEALER connected to the daemon at ``target`` as a CurveZMQ peer: with a key of its own
    bound to ``address`` (default ``tcp://127.0.0.1:<free port>``) and, if ``authorized``, trusted by
    the daemons of ``tmp`` (tests that speak the peer protocol to a daemon). Close it after use."""
    import zmq

    from kvd.shell.peer_auth import keygen

    address = address or f"tcp://127.0.0.1:{free_port()}"
    trust = tmp / "trust"
    public, secret = keygen(trust / f"peer-{name}", address, force=True)
    if authorized:
        (trust / "authorized").mkdir(parents=True, exist_ok=True)
        (trust / "authorized" / f"peer-{name}.key").write_bytes(public.read_bytes())
        time.sleep(1.1)  # the daemon rescans its directory at most once a second
    pub, sec = zmq.auth.load_certificate(str(secret))
    server, _ = zmq.auth.load_certificate(str(trust / target / "kvd.key"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server
    return sock


def peer_router(tmp: Path, name: str, address: str):
    """A CURVE-server ROUTER bound to ``address`` with the key :func:`peer_socket` made for ``name``:
    where a daemon's replies to that test peer arrive. Close it after use."""
    import zmq

    pub, sec = zmq.auth.load_certificate(str(tmp / "trust" / f"peer-{name}" / "kvd.key_secret"))
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = pub, sec
    sock.bind(address)
    return sock


def start_daemon(tmp: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> DaemonProc:
    """Start `python -m kvd` and wait until its socket answers a status request. The daemons of
    one ``tmp`` trust each other with CurveZMQ keys (``trust_flags``) unless ``--peer-insecure``
    is among ``extra``."""
    sock = str(tmp / f"{name}.sock")
    port = free_port()
    log_path = tmp / f"{name}.log"
    insecure = any(arg.startswith("--peer-insecure") for arg in extra)
    if "--peer-port" in extra:  # the last one wins, as argparse has it
        port = int(extra[len(extra) - 1 - list(reversed(extra)).index("--peer-port") + 1])
    trust = [] if insecure else trust_flags(tmp, name, f"tcp://127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "kvd", "--socket-path", sock, "--peer-port", str(port),
           "--node-hostname", "127.0.0.1", "--log-format", "json",
           "--timeouts-heartbeat-interval-s", "0.5", *trust, *extra]
    with open(log_path, "w") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
    d = DaemonProc(name, sock, port, proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvd {name} exited with {proc.returncode}:\n{d.log()}")
        try:
            d.status()
            return d
        except OSError:
            time.sleep(0.1)
        except Exception:
            time.sleep(0.1)
    d.stop()
    raise RuntimeError(f"kvd {name} did not come up:\n{d.log()}")


def _prefill(q, barrier, sock, layout, rooms, bootstrap, chunk_pages, timeout, warm=False):
    r = run_prefill_rank(sock, layout, rooms, seed=7, chunk_pages=chunk_pages, bootstrap=bootstrap,
                         timeout=timeout, on_ready=lambda _pool: barrier.wait(), warm=warm)
    q.put(r)


def _decode(q, barrier, sock, layout, rooms, bootstrap, prefill_page_size, timeout, warm=False):
    r = run_decode_rank(sock, layout, rooms, bootstrap, "P", prefill_page_size, seed=7, timeout=timeout,
                        on_ready=lambda _pool: barrier.wait(), warm=warm)
    q.put(r)


def make_plan(rooms: int, pages_per_room: int, src_pages: int, dst_pages: int, seed: int = 0,
              length_cut: bool = False, page_size: int = 1, contiguous: bool = False) -> list[RoomPlan]:
    """Random, non-overlapping page choices on both sides (so untouched pages are checked too);
    ``contiguous``: each room's pages are one run on both sides (a fresh pool's allocation)."""
    rng = random.Random(seed)
    if contiguous:
        src, dst = list(range(rooms * pages_per_room)), list(range(rooms * pages_per_room))
    else:
        src = rng.sample(range(src_pages), rooms * pages_per_room)
        dst = rng.sample(range(dst_pages), rooms * pages_per_room)
    plans = []
    for i in range(rooms):
        s = src[i * pages_per_room:(i + 1) * pages_per_room]
        d = dst[i * pages_per_room:(i + 1) * pages_per_room]
        length = None
        if length_cut:  # HiSparse: the request ends mid-page; dst are token indices
            length = (pages_per_room - 1) * page_size + rng.randint(1, page_size)
        plans.append(RoomPlan(room=1000 + i, src_pages=s, dst_pages=d, length=length))
    return plans


def hisparse_plan(rooms: int, pages_per_room: int, src_pages: int, page_size: int, dst_tokens: int,
                  seed: int = 0, contiguous: bool = False) -> list[RoomPlan]:
    """HiSparse rooms: each ends mid-page; destinations are host-pool token indices, random
    (scattered) or, with ``contiguous``, one run per room (a fresh host allocator)."""
    rng = random.Random(seed)
    if contiguous:
        src = list(range(rooms * pages_per_room))
        free = list(range(rooms * pages_per_room * page_size))
    else:
        src = rng.sample(range(src_pages), rooms * pages_per_room)
        free = rng.sample(range(dst_tokens), rooms * pages_per_room * page_size)
    plans = []
    for i in range(rooms):
        length = (pages_per_room - 1) * page_size + rng.randint(1, page_size)
        d = free[i * pages_per_room * page_size:][:length]
        plans.append(RoomPlan(room=2000 + i, src_pages=src[i * pages_per_room:(i + 1) * pages_per_room],
                              dst_pages=d, length=length))
    return plans


def run_cluster(prefill, decode, *, prefill_tp: int, decode_tp: int, kv_heads: int = 8,
                layers: int = 2, head_dim: int = 16, page_size: int = 4, num_pages: int = 64,
                rooms: int = 3, pages_per_room: int = 5, mla: bool = False, hisparse: bool = False,
                chunk_pages: int = 2, dtype: str = "bfloat16", timeout: float = 60.0,
                contiguous: bool = False, warm: bool = False) -> list:
    """Run a whole transfer; returns every rank's RankReport (asserting is the caller's job).
    ``warm``: every rank runs the same rooms once, untimed, before the timed round.

    ``prefill`` may be a list of daemons: prefill rank r registers with daemon r % len, and
    the first daemon is the engine's directory (a prefill engine spread over several nodes).
    """
    prefills = prefill if isinstance(prefill, list | tuple) else [prefill]
    prefill = prefills[0]
    if hisparse:
        plan = hisparse_plan(rooms, pages_per_room, num_pages, page_size, num_pages * page_size,
                             contiguous=contiguous)
    else:
        plan = make_plan(rooms, pages_per_room, num_pages, num_pages, contiguous=contiguous)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(prefill_tp + decode_tp)
    procs = []
    for r in range(prefill_tp):
        lay = build_layout("prefill", "P", prefill_tp, r, layers, kv_heads, head_dim, dtype, page_size,
                           num_pages, mla=mla)
        home = prefills[r % len(prefills)]
        procs.append(ctx.Process(target=_prefill, args=(q, barrier, home.socket_path, lay, plan,
                                                        prefill.address, chunk_pages, timeout, warm)))
    for r in range(decode_tp):
        lay = build_layout("decode", "D", decode_tp, r, layers, kv_heads, head_dim, dtype, page_size,
                           num_pages, mla=mla, hisparse=hisparse)
        procs.append(ctx.Process(target=_decode, args=(q, barrier, decode.socket_path, lay, plan,
                                                       prefill.address, page_size, timeout, warm)))
    for proc in procs:
        proc.start()
    reports = [q.get(timeout=timeout + 60) for _ in procs]
    for proc in procs:
        proc.join(30)
    return reports


def throughput(reports) -> tuple[int, float]:
    """(decode bytes, seconds) of one run: from the first rank's start to the last rank's end."""
    dec = [r for r in reports if r.role == "decode"]
    nbytes = sum(r.bytes for r in dec)
    seconds = max(r.t_end for r in reports) - min(r.t_start for r in reports)
    return nbytes, seconds


def failures(reports) -> list[tuple]:
    """(role, rank, failed rooms, first mismatches, error) of every rank that was not ok."""
    return [(r.role, r.rank, r.rooms_failed, r.mismatches[:3], r.error) for r in reports if not r.ok]
