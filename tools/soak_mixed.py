"""Mixed-workload soak: many concurrent rooms of realistic lengths through two real daemons
(issue 15, item 4).

Input lengths follow chat traffic: a log-normal body of short prompts (median ~350 tokens)
with a long tail, clipped to 16..32,768 tokens. Each room takes pages from a shared page
pool (it waits for free pages, as a real engine's allocator does), goes chunk by chunk
(chunked prefill: at most ``--chunk-tokens`` per chunk) through Mooncake TCP on loopback, and
gives its pages back once both engines hold the final event. Every ``--verify-every``-th room
is checked byte for byte (each room writes its own pattern into its prefill pages).

Every ``--report-s`` seconds it prints rooms/s, bytes/s, latency p50/p99/p999 by length
class, and both daemons' RSS; at the end it says whether RSS stayed flat (the last third's
peak against the first third's, after warm-up).

    python3 tools/soak_mixed.py --inflight 128 --minutes 30
    python3 tools/soak_mixed.py --inflight 1024 --minutes 30
    python3 tools/soak_mixed.py --inflight 128 1024 --minutes 2    # both, shorter
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from kvd.engineclient.hostpool import HostPool  # noqa: E402
from kvd.engineclient.replies import ReplyTracker, RoomFailed  # noqa: E402
from tools.bench_control import EnginePair, cpu_seconds, stop_daemons  # noqa: E402
from tools.cluster import DaemonProc, start_daemon  # noqa: E402

PAGE = 16
CLASSES = ((0, 512, "<=512"), (513, 4096, "513-4k"), (4097, 32768, ">4k"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def draw_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Chat-like prompt lengths: log-normal (median ~350, heavy tail), clipped to 16..32k."""
    return np.clip(rng.lognormal(mean=np.log(350), sigma=1.3, size=n), 16, 32768).astype(np.int64)


class Pages:
    """One engine's page allocator; a room waits until enough pages are free (FIFO, so a long
    room is not starved).

    ``sorted`` is SGLang's paged allocator: freed pages wait aside and are merged back, sorted,
    when the free list runs short (``merge_and_sort_free``), so rooms tend to get runs of
    neighbouring pages. ``fifo`` hands pages out in the order they were freed: the worst case, every page of
    a room scattered once the pool has turned over."""

    def __init__(self, num_pages: int, policy: str) -> None:
        self.free: deque[int] = deque(range(num_pages))
        self.released: list[int] = []
        self.policy = policy
        self.waiters: deque[tuple[int, asyncio.Future[list[int]]]] = deque()

    def _available(self) -> int:
        return len(self.free) + len(self.released)

    def _pop(self, n: int) -> list[int]:
        if self.released and len(self.free) < n:  # as SGLang: merge (and sort) only when short
            merged = sorted([*self.free, *self.released]) if self.policy == "sorted" else [*self.free, *self.released]
            self.free, self.released = deque(merged), []
        return [self.free.popleft() for _ in range(n)]

    async def take(self, n: int) -> list[int]:
        if not self.waiters and self._available() >= n:
            return self._pop(n)
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.waiters.append((n, fut))
        return await fut

    def give(self, pages: list[int]) -> None:
        self.released.extend(pages)
        while self.waiters and self._available() >= self.waiters[0][0]:
            n, fut = self.waiters.popleft()
            fut.set_result(self._pop(n))


class Mixed(EnginePair):
    """Rooms of chat-like lengths between the two engines, each engine with its own allocator."""

    def __init__(self, prefill: DaemonProc, decode: DaemonProc, num_pages: int, chunk_tokens: int,
                 verify_every: int, seed: int, allocator: str) -> None:
        super().__init__(prefill, decode, layers=2, kv_heads=1, head_dim=64, dtype="bfloat16", page_size=PAGE,
                         num_pages=num_pages)
        # Each engine allocates its own pages: a room's source and destination runs differ.
        self.src_pages, self.dst_pages = Pages(num_pages, allocator), Pages(num_pages, allocator)
        self.chunk_pages = max(1, chunk_tokens // PAGE)
        self.verify_every = verify_every
        self.rng = np.random.default_rng(seed)
        self.done: list[tuple[float, int, float]] = []  # (end time, tokens, latency)
        self.bytes_moved = 0
        self.failed: Counter[str] = Counter()
        self.mismatched = 0
        self.verified = 0

    def _token_rows(self, pool: HostPool, pages: list[int]) -> list[np.ndarray]:
        idx = (np.asarray(pages)[:, None] * PAGE + np.arange(PAGE)[None, :]).reshape(-1)
        return [buf[idx] for buf in pool.buffers()]

    async def room(self, tokens: int) -> None:
        room, self.next_room = self.next_room, self.next_room + 1
        n_pages = -(-tokens // PAGE)
        src = await self.src_pages.take(n_pages)
        dst = await self.dst_pages.take(n_pages)
        check = self.verify_every > 0 and room % self.verify_every == 0
        try:
            if check:  # this room's own pattern in its prefill pages
                idx = (np.asarray(src)[:, None] * PAGE + np.arange(PAGE)[None, :]).reshape(-1)
                for b, buf in enumerate(self.ppool.buffers()):
                    buf[idx] = (room * 31 + b * 7 + np.arange(buf[idx].size).reshape(buf[idx].shape)) % 251
            t0 = time.perf_counter()
            dfut, pfut = self.dc.expect(room, released=True), self.pc.expect(room, released=False)
            await self.dc.recv(self.pid_d, room, self.prefill.address, "P", dst)
            for i in range(0, n_pages, self.chunk_pages):
                last = i + self.chunk_pages >= n_pages
                await self.pc.send(self.pid_p, room, src[i:i + self.chunk_pages], is_last=last,
                                   aux=b"t" if last else b"")
            for st in await asyncio.gather(dfut, pfut):
                ReplyTracker.check_final(st)
            self.done.append((time.monotonic(), tokens, time.perf_counter() - t0))
            self.bytes_moved += n_pages * self.play.page_bytes * self.play.num_buffers
            if check:
                self.verified += 1
                a, b = self._token_rows(self.ppool, src), self._token_rows(self.dpool, dst)
                if any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)):
                    self.mismatched += 1
        except RoomFailed as exc:
            self.failed[str(exc)[:80]] += 1
        finally:
            self.src_pages.give(src)
            self.dst_pages.give(dst)


def percentiles(lat: list[float]) -> str:
    if not lat:
        return "-"
    a = np.sort(np.asarray(lat)) * 1e3
    return f"{np.percentile(a, 50):.1f}/{np.percentile(a, 99):.1f}/{np.percentile(a, 99.9):.1f}"


async def soak(args: argparse.Namespace, inflight: int, tmp: Path) -> dict[str, Any]:
    flags = ("--timeouts-waiting-s", "120", "--timeouts-transfer-s", "120", *args.daemon_flag)
    prefill = start_daemon(tmp, f"prefill{inflight}", *flags)
    decode = start_daemon(tmp, f"decode{inflight}", *flags)
    out: dict[str, Any] = {"inflight": inflight, "intervals": []}
    try:
        async with Mixed(prefill, decode, args.pages, args.chunk_tokens, args.verify_every, args.seed,
                         args.allocator) as m:
            stop_at = time.monotonic() + args.minutes * 60
            lengths = iter(draw_lengths(m.rng, 10_000_000))

            async def worker() -> None:
                while time.monotonic() < stop_at:
                    await m.room(int(next(lengths)))

            workers = [asyncio.ensure_future(worker()) for _ in range(inflight)]
            t_last, seen, bytes_last = time.monotonic(), 0, 0
            cpu0 = {k: cpu_seconds(p.proc.pid) for k, p in (("prefill", prefill), ("decode", decode))}
            print(f"--- {inflight} rooms in flight, {args.minutes:g} min, {args.allocator} allocator, "
                  f"pools of {args.pages} pages of {PAGE} tokens "
                  f"({m.play.page_bytes * m.play.num_buffers} B/page), chunks of {m.chunk_pages} pages", flush=True)
            print("   t(s)   rooms/s    MB/s   latency ms p50/p99/p999: all | <=512 | 513-4k | >4k"
                  "          RSS MiB prefill/decode", flush=True)
            while time.monotonic() < stop_at:
                await asyncio.sleep(min(args.report_s, max(0.1, stop_at - time.monotonic())))
                now = time.monotonic()
                new = m.done[seen:]
                seen = len(m.done)
                lat = [x[2] for x in new]
                by = [percentiles([x[2] for x in new if lo <= x[1] <= hi]) for lo, hi, _ in CLASSES]
                rss = (rss_bytes(prefill.proc.pid), rss_bytes(decode.proc.pid))
                rec = {"t": round(now - (stop_at - args.minutes * 60), 1), "rooms_per_s": len(new) / (now - t_last),
                       "mb_per_s": (m.bytes_moved - bytes_last) / (now - t_last) / 1e6, "lat": percentiles(lat),
                       "rss": rss}
                out["intervals"].append(rec)
                print(f"  {rec['t']:6.0f}  {rec['rooms_per_s']:8.0f}  {rec['mb_per_s']:7.1f}   "
                      f"{rec['lat']:>18} | {by[0]:>14} | {by[1]:>14} | {by[2]:>16}   "
                      f"{rss[0] / 2**20:7.1f} / {rss[1] / 2**20:7.1f}", flush=True)
                t_last, bytes_last = now, m.bytes_moved
            await asyncio.gather(*workers)
            daemon = prefill.status()["daemon"]
            out["prefill_writes"] = {k: daemon.get(f"{k}_total", 0) for k in ("write_ops", "batches", "inline_writes")}
            cpu = {k: cpu_seconds(p.proc.pid) - cpu0[k] for k, p in (("prefill", prefill), ("decode", decode))}
        ivs = out["intervals"]
        third = max(1, len(ivs) // 3)
        first = max(max(iv["rss"]) for iv in ivs[1:1 + third]) if len(ivs) > 2 else max(ivs[0]["rss"])
        last = max(max(iv["rss"]) for iv in ivs[-third:])
        all_lat = [x[2] for x in m.done]
        out |= {"rooms": len(m.done), "failed": dict(m.failed), "verified": m.verified, "mismatched": m.mismatched,
                "rss_first_third": first, "rss_last_third": last, "rss_growth": last / first - 1,
                "cpu_us_per_room": {k: v / max(1, len(m.done)) * 1e6 for k, v in cpu.items()}}
        print(f"  total {len(m.done):,} rooms ({sum(x[1] for x in m.done):,} tokens), failed {dict(m.failed) or 0}, "
              f"verified {m.verified} byte for byte, mismatched {m.mismatched}; latency ms p50/p99/p999 "
              f"{percentiles(all_lat)}; CPU/room prefill {out['cpu_us_per_room']['prefill']:.0f} us, "
              f"decode {out['cpu_us_per_room']['decode']:.0f} us", flush=True)
        w = out["prefill_writes"]
        print(f"  prefill daemon: {w['write_ops']:,} Mooncake write ops in {w['batches']:,} batches "
              f"({w['write_ops'] / max(1, w['batches']):.0f} ops per batch: pages scattered by the allocator "
              f"are one op each), {w['inline_writes']:,} inline writes", flush=True)
        print(f"  RSS peak first third {first / 2**20:.1f} MiB -> last third {last / 2**20:.1f} MiB "
              f"({out['rss_growth']:+.1%}): {'flat' if out['rss_growth'] < 0.05 else 'GROWING'}", flush=True)
    finally:
        stop_daemons(prefill, decode)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--inflight", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--report-s", type=float, default=30.0)
    ap.add_argument("--pages", type=int, default=65536, help="pages in each engine's pool")
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="most tokens per chunk (chunked prefill)")
    ap.add_argument("--verify-every", type=int, default=50, help="check every n-th room byte for byte (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--allocator", choices=("sorted", "fifo"), default="sorted",
                    help="page allocator of both engines: SGLang's (free pages merged and sorted) or FIFO")
    ap.add_argument("--daemon-flag", action="append", default=[], help="extra daemon flag (repeatable)")
    args = ap.parse_args(argv)
    bad = 0
    for inflight in args.inflight:
        with tempfile.TemporaryDirectory(prefix="kvd-soak-") as tmp:
            try:
                import uvloop
                res = uvloop.run(soak(args, inflight, Path(tmp)))
            except ImportError:  # pragma: no cover
                res = asyncio.run(soak(args, inflight, Path(tmp)))
        bad += bool(res["failed"]) + bool(res["mismatched"]) + (res["rss_growth"] >= 0.05)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
