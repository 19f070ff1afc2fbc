"""A fake inference-engine rank: a host KV pool, the kvd client, and a byte-exact check.

Run one process per TP rank (``python tools/fake_engine.py --role prefill|decode ...``) or
call :func:`run_prefill_rank` / :func:`run_decode_rank` from tests and the demo. A prefill
rank fills its pool with :mod:`kvpattern`'s pattern, registers it and sends every planned
room chunk by chunk; a decode rank fills its pool with a canary byte, asks kvd to receive
every room into its pages and then checks every byte of its pool. Neither ever reads the
other side's memory: the expected bytes follow from the seed and the plan alone.

Stdout carries exactly two lines: ``READY <pool_id>`` once the pool is registered, then one
JSON report. With ``--wait-go`` the rank waits for a line on stdin after READY, so a
driver can start every rank's transfers at once and time one batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from kvd.client import KvdClient, KvdError, KvdTimeout, RoomFailed, RoomStatus
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

DEFAULT_CANARY = 0x5A


@dataclass(frozen=True)
class RoomPlan:
    """One request's pages on both sides; ``length`` (tokens) only matters for HiSparse."""

    room: int
    src_pages: list[int]
    dst_pages: list[int]
    length: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoomPlan:
        return cls(room=int(d["room"]), src_pages=[int(x) for x in d["src_pages"]],
                   dst_pages=[int(x) for x in d["dst_pages"]],
                   length=None if d.get("length") is None else int(d["length"]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"room": self.room, "src_pages": self.src_pages, "dst_pages": self.dst_pages}
        if self.length is not None:
            out["length"] = self.length
        return out

    def tokens(self, page_size: int, hisparse: bool) -> tuple[np.ndarray, np.ndarray]:
        """(source tokens, destination tokens): HiSparse destinations are token indices and
        the source is cut to the real length; otherwise both sides are whole pages."""
        if hisparse:
            length = len(self.dst_pages) if self.length is None else self.length
            return (pages_to_tokens(self.src_pages, page_size, length),
                    np.asarray(self.dst_pages[:length], dtype=np.int64))
        return pages_to_tokens(self.src_pages, page_size), pages_to_tokens(self.dst_pages, page_size)


def load_plan(path: str | Path) -> list[RoomPlan]:
    data = json.loads(Path(path).read_text())
    rooms = data["rooms"] if isinstance(data, dict) else data
    return [RoomPlan.from_dict(r) for r in rooms]


def build_layout(role: str, engine_id: str, tp_size: int, tp_rank: int, layers: int, kv_heads: int,
                 head_dim: int, dtype: str, page_size: int, num_pages: int, mla: bool = False,
                 hisparse: bool = False) -> PoolLayout:
    """The rank's pool layout. A HiSparse decode pool is a host pool of page size 1 with the
    same token capacity (num_pages * page_size tokens); MLA has one latent head."""
    if hisparse and role == "decode":
        num_pages, page_size = num_pages * page_size, 1
    return PoolLayout(engine_id=engine_id, role=role, tp_size=tp_size, tp_rank=tp_rank,
                      num_layers=layers, total_kv_heads=1 if mla else kv_heads, head_dim=head_dim,
                      dtype=dtype, page_size=page_size, num_pages=num_pages, is_mla=mla,
                      hisparse=hisparse and role == "decode")


@dataclass
class RankReport:
    """What a rank prints as its JSON line (and returns to in-process callers)."""

    role: str
    rank: int
    pool_id: int = -1
    rooms_ok: int = 0
    rooms_failed: dict[int, str] = field(default_factory=dict)
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (self.rooms_failed or self.mismatches or self.error)

    def to_json(self) -> str:
        d = dict(vars(self), ok=self.ok, rooms_failed={str(k): v for k, v in self.rooms_failed.items()})
        return json.dumps(d)


def _wait_all(client: KvdClient, rooms: Sequence[RoomPlan], timeout: float,
              report: RankReport) -> dict[int, RoomStatus]:
    """Wait for every room's final state within one overall deadline; failures go in report."""
    deadline = time.monotonic() + timeout
    done: dict[int, RoomStatus] = {}
    for r in rooms:
        try:
            done[r.room] = client.wait(r.room, timeout=max(0.0, deadline - time.monotonic()))
        except RoomFailed as exc:
            report.rooms_failed[r.room] = exc.status.reason or "failed"
        except KvdTimeout:
            report.rooms_failed[r.room] = f"no final state within {timeout}s"
    return done


@contextlib.contextmanager
def _errors_to(report: RankReport) -> Iterator[None]:
    """A rank that cannot go on (daemon gone, request refused) still returns its report."""
    try:
        yield
    except (KvdError, OSError, ValueError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _chunks(pages: list[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [pages[i:i + size] for i in range(0, len(pages), size)] or [[]]


WARM_ROOM_OFFSET = 500_000  # a warm-up round's room ids: the timed room's + this


def _warm(rooms: Sequence[RoomPlan]) -> list[RoomPlan]:
    return [dataclasses.replace(r, room=r.room + WARM_ROOM_OFFSET) for r in rooms]


def run_prefill_rank(socket_path: str, layout: PoolLayout, rooms: Sequence[RoomPlan], seed: int = 1,
                     chunk_pages: int = 4, bootstrap: str = "", timeout: float = 120.0,
                     on_ready: Callable[[int], None] | None = None, warm: bool = False) -> RankReport:
    """Fill, register, send every room chunk by chunk (aux ``aux-<room>`` on the last), wait.

    ``on_ready(pool_id)`` runs after registration and may block (a start barrier). ``warm``: the
    same rooms once first (other ids, same pages), untimed, then ``on_ready`` again: the timed
    round writes into pools and connections that have been used (what an engine runs on).
    """
    report = RankReport(role="prefill", rank=layout.tp_rank)
    with _errors_to(report), HostPool.create(layout) as pool, \
            KvdClient(socket_path, timeout=min(timeout, 60.0)) as client:
        fill_prefill(pool, layout, seed)
        report.pool_id = client.register_pool(layout, pool, bootstrap=bootstrap)
        if on_ready is not None:
            on_ready(report.pool_id)
        if warm:
            _send_rooms(client, report.pool_id, _warm(rooms), chunk_pages)
            _wait_all(client, _warm(rooms), timeout, RankReport(role="prefill", rank=layout.tp_rank))
            if on_ready is not None:
                on_ready(report.pool_id)
        report.t_start = time.time()
        _send_rooms(client, report.pool_id, rooms, chunk_pages)
        done = _wait_all(client, rooms, timeout, report)
        report.t_end = time.time()
        report.rooms_ok = len(done)
        report.bytes = sum(st.bytes_done for st in done.values())
    return report


def _send_rooms(client: KvdClient, pool_id: int, rooms: Sequence[RoomPlan], chunk_pages: int) -> None:
    for r in rooms:
        chunks = _chunks(r.src_pages, chunk_pages)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # As a prefill engine would: no round trip per chunk (a refusal fails the room);
            # FAKE_ENGINE_BLOCKING_SENDS=1 waits for each reply instead (to compare the two).
            client.send(pool_id, r.room, chunk, is_last=last, aux=f"aux-{r.room}".encode() if last else b"",
                        wait=os.environ.get("FAKE_ENGINE_BLOCKING_SENDS") is not None)


def run_decode_rank(socket_path: str, layout: PoolLayout, rooms: Sequence[RoomPlan], bootstrap_addr: str,
                    prefill_engine_id: str, prefill_page_size: int, seed: int = 1,
                    canary: int = DEFAULT_CANARY, timeout: float = 120.0,
                    on_ready: Callable[[int], None] | None = None, warm: bool = False) -> RankReport:
    """Canary-fill, register, receive every room, wait, then check every byte of the pool.

    ``prefill_page_size`` expands source pages to tokens (it differs from the pool's page
    size only for a HiSparse pool). ``bytes`` counts the verified bytes of rooms that
    succeeded.
    """
    report = RankReport(role="decode", rank=layout.tp_rank)
    with _errors_to(report), HostPool.create(layout) as pool, \
            KvdClient(socket_path, timeout=min(timeout, 60.0)) as client:
        fill_canary(pool, canary)
        report.pool_id = client.register_pool(layout, pool)
        if on_ready is not None:
            on_ready(report.pool_id)
        if warm:  # the same pages once, untimed (the timed round writes the same bytes again)
            for r in _warm(rooms):
                client.recv(report.pool_id, r.room, bootstrap_addr, prefill_engine_id, r.dst_pages,
                            enable_hisparse=layout.hisparse)
            _wait_all(client, _warm(rooms), timeout, RankReport(role="decode", rank=layout.tp_rank))
            if on_ready is not None:
                on_ready(report.pool_id)
        report.t_start = time.time()
        for r in rooms:
            client.recv(report.pool_id, r.room, bootstrap_addr, prefill_engine_id, r.dst_pages,
                        enable_hisparse=layout.hisparse)
        done = _wait_all(client, rooms, timeout, report)
        report.t_end = time.time()
        src_parts, dst_parts, ignore = [], [], []
        for r in rooms:
            src, dst = r.tokens(prefill_page_size, layout.hisparse)
            if r.room not in done:
                ignore.append(dst)
                continue
            src_parts.append(src)
            dst_parts.append(dst)
            report.rooms_ok += 1
            report.bytes += len(dst) * layout.token_bytes * layout.num_buffers
            if done[r.room].aux != f"aux-{r.room}".encode():
                report.mismatches.append(f"room {r.room}: aux {done[r.room].aux!r}, expected "
                                         f"{f'aux-{r.room}'.encode()!r}")
        report.mismatches += verify_decode(pool, layout, _cat(src_parts), _cat(dst_parts), seed, canary,
                                           ignore_tokens=_cat(ignore))
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--role", choices=("prefill", "decode"), required=True)
    ap.add_argument("--socket", required=True, help="the local kvd's Unix socket")
    ap.add_argument("--engine-id", required=True, help="this rank's engine id")
    ap.add_argument("--tp-size", type=int, required=True)
    ap.add_argument("--tp-rank", type=int, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=8, help="total KV heads of the model")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--page-size", type=int, default=16, help="the model's (prefill) page size")
    ap.add_argument("--num-pages", type=int, default=256,
                    help="pool pages (HiSparse decode: num-pages * page-size tokens, page size 1)")
    ap.add_argument("--mla", action="store_true")
    ap.add_argument("--hisparse", action="store_true", help="decode into a HiSparse host pool")
    ap.add_argument("--bootstrap", default="",
                    help="prefill: directory daemon to register with; decode: bootstrap_addr of recv")
    ap.add_argument("--prefill-engine-id", default="", help="decode: the engine to receive from")
    ap.add_argument("--plan", help='JSON: [{"room", "src_pages", "dst_pages", "length"?}, ...]')
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--canary", type=lambda s: int(s, 0), default=DEFAULT_CANARY)
    ap.add_argument("--chunk-pages", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all rooms")
    ap.add_argument("--wait-go", action="store_true", help="after READY, wait for a line on stdin")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rooms = load_plan(args.plan) if args.plan else []

    def ready(pool_id: int) -> None:
        print(f"READY {pool_id}", flush=True)
        if args.wait_go:
            sys.stdin.readline()

    report = RankReport(role=args.role, rank=args.tp_rank)
    with _errors_to(report):  # a bad layout never reaches run_*
        layout = build_layout(args.role, args.engine_id, args.tp_size, args.tp_rank, args.layers,
                              args.kv_heads, args.head_dim, args.dtype, args.page_size, args.num_pages,
                              args.mla, args.hisparse)
        if args.role == "prefill":
            report = run_prefill_rank(args.socket, layout, rooms, args.seed, args.chunk_pages,
                                      args.bootstrap, args.timeout, ready)
        else:
            report = run_decode_rank(args.socket, layout, rooms, args.bootstrap, args.prefill_engine_id,
                                     args.page_size, args.seed, args.canary, args.timeout, ready)
    print(report.to_json(), flush=True)
    if report.error:
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
